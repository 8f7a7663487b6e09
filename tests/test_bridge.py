"""The cross-vocabulary bridge: incremental re-tokenization and bridged generation.

Properties (hypothesis) run on real tokenizers: gpt2 <-> smollm2 in the fast suite; every pair of
gpt2, smollm2, qwen2 and gemma3 under ``zoo`` (the qwen2 / gemma3 tokenizers are extracted from
zoo GGUF files, a fetch on a fresh machine).
"""

from __future__ import annotations

import itertools
import unicodedata

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ivl
from ivl.engine import IVLEngine, IVLModel, SamplingParams
from ivl.engine.bridge import Bridge
from ivl.models.tiny import load_real_tokenizer, tiny_model

ALL = ("gpt2", "smollm2", "qwen2", "gemma3")
CHEAP_PAIRS = [("gpt2", "smollm2"), ("smollm2", "gpt2")]
ZOO_PAIRS = [p for p in itertools.permutations(ALL, 2) if p not in CHEAP_PAIRS]

_TOKS: dict[str, object] = {}
_BRIDGES: dict[tuple, Bridge] = {}


def tok(kind: str):
    if kind not in _TOKS:
        _TOKS[kind] = load_real_tokenizer(kind)
    return _TOKS[kind]


def bridge(base: str, value: str, **kw) -> Bridge:
    key = (base, value, tuple(sorted(kw.items())))
    if key not in _BRIDGES:
        _BRIDGES[key] = Bridge(tok(base), tok(value), **kw)
    return _BRIDGES[key]


FRAGMENTS = [
    " ",
    "  ",
    "\n",
    "\n\n",
    "\t",
    "   \n  ",
    "the",
    " cat",
    "Hello",
    ",",
    ".",
    "!",
    "'s",
    "'l",
    "l",
    "'LL",
    "\r\n",
    "<|im_start|>",  # an added token of SmolLM2 and Qwen2 that GPT-2 spells as plain text
    "<start_of_turn>",  # Gemma3's
    "123",
    " 4567",
    "3.14",
    "def f(x):\n    return x**2",
    '{"a": [1, 2]}',
    "<b> </b>",
    "日本語のテキスト",
    "漢字",
    "café",
    "naïve",
    "😀",
    "e\u0301",
    "Ελληνικά",
    "---",
]
# Assigned characters only: SmolLM2's vocabulary lacks some byte tokens, so its encoding of
# unassigned / private-use code points is lossy and decodes unstably (a tokenizer defect, not
# the bridge's).
_chars = st.characters(blacklist_categories=("Cs", "Cn", "Co"), blacklist_characters="\ufffd\x00")
TEXTS = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.text(_chars, min_size=1, max_size=6)),
    min_size=1,
    max_size=14,
).map("".join)


def _norm(kind: str, text: str) -> str:
    return unicodedata.normalize("NFC", text) if kind == "qwen2" else text  # qwen2 normalises NFC


def check_pair(base: str, value: str, text: str, prompt_len: int) -> None:
    """Feed ``text``'s base tokens one by one; compare with re-encoding everything each step."""
    br = bridge(base, value)
    bt, vt = tok(base), tok(value)
    ids = bt(text, add_special_tokens=True)["input_ids"]
    if len(ids) < 2:
        return
    cut = max(1, min(prompt_len, len(ids) - 1))
    state = br.start(ids[:cut])
    committed = list(state.ids[: state.committed])
    for i in range(cut, len(ids)):
        in_cache = list(state.ids)  # what the engine has fed the value model so far
        state.cached = len(in_cache)
        br.step(state, ids[i])
        if state.ids:  # (the engine refuses prompts without text for the value model)
            keep, new = state.feed()  # the engine crops the value cache to keep, feeds new
            assert in_cache[:keep] == state.ids[:keep], "stale ids left in the value cache"
            assert state.ids[keep:] == new and new
        ref = br.reference(ids[: i + 1])
        # the spec: the value prefix + the value encoding of the base text, which is the
        # tokenizer's own decoding whenever that holds no incomplete character
        text = br.text_of([t for t in ids[: i + 1] if t not in br.base_special])
        decoded = bt.decode(
            [t for t in ids[: i + 1] if t not in br.base_special],
            clean_up_tokenization_spaces=False,
        )
        if "\ufffd" not in decoded:
            assert text == decoded
        else:  # only the bytes of one incomplete character are held back
            assert len(decoded.encode()) - len(text.encode()) <= 3 * decoded.count("\ufffd")
        if not any(t in br.base_special for t in br._strip_prefix(ids[: i + 1])):  # one text run
            assert ref == br.value_prefix + (
                vt(text, add_special_tokens=False)["input_ids"] if text else []
            )
        assert state.fallback_cuts == 0
        assert state.ids == ref, (i, repr(decoded[-20:]))
        # committed ids never change once committed
        assert state.ids[: len(committed)] == committed
        committed = list(state.ids[: state.committed])
    # decoding round-trips (where the value tokenizer can spell the text at all: SmolLM2
    # lacks some bytes)
    want = _norm(value, bt.decode(ids, skip_special_tokens=True))
    own = vt.decode(vt(want, add_special_tokens=False)["input_ids"], skip_special_tokens=True)
    got = vt.decode(
        state.ids[len(br.value_prefix) :],
        skip_special_tokens=True,
        clean_up_tokenization_spaces=False,
    )
    if own == want:
        assert got == want


@pytest.mark.parametrize(("base", "value"), CHEAP_PAIRS)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=TEXTS, prompt_len=st.integers(1, 6))
def test_bridge_matches_full_reencode(base, value, text, prompt_len):
    check_pair(base, value, text, prompt_len)


@pytest.mark.zoo
@pytest.mark.parametrize(("base", "value"), ZOO_PAIRS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=TEXTS, prompt_len=st.integers(1, 6))
def test_bridge_matches_full_reencode_zoo(base, value, text, prompt_len):
    check_pair(base, value, text, prompt_len)


def test_bridge_reencodes_only_a_short_tail():
    """The text since the safe boundary stays short on ordinary prose and code."""
    br = bridge("gpt2", "smollm2")
    text = ("The quick brown fox jumps over the lazy dog, 12 times.\n" * 20) + (
        "def f(x):\n    return [i * 2 for i in range(x)]\n" * 10
    )
    ids = tok("gpt2")(text)["input_ids"]
    state = br.start(ids[:3])
    longest = 0
    for t in ids[3:]:
        br.step(state, t)
        longest = max(longest, len(state.tail))
    assert state.ids == br.reference(ids)
    assert longest <= 40, longest
    # a base token that starts a word re-encodes itself only, one that continues a word that
    # word (the rule for byte-level value tokenizers)
    assert state.encoded / state.steps <= 1.5, state.encoded / state.steps


def test_bridge_fallback_boundary_on_long_runs():
    """Whitespace-free text longer than max_tail: the tail stays bounded, the text round-trips."""
    br = Bridge(tok("smollm2"), tok("gpt2"), max_tail=32)
    text = "漢字かなカナ" * 40
    ids = tok("smollm2")(text)["input_ids"]
    state = br.start(ids[:2])
    for t in ids[2:]:
        br.step(state, t)
        assert len(state.tail) <= 33 + 8
    assert state.fallback_cuts > 0
    assert tok("gpt2").decode(state.ids, clean_up_tokenization_spaces=False) == text


def test_bridge_specials_are_boundaries():
    """<|endoftext|> exists in both GPT-2 and SmolLM2: it maps by content; <|im_start|> does not."""
    br = bridge("smollm2", "gpt2")
    s = tok("smollm2")
    eot, ims = s.convert_tokens_to_ids("<|endoftext|>"), s.convert_tokens_to_ids("<|im_start|>")
    ids = s("Hello there")["input_ids"] + [eot] + s(" General")["input_ids"] + [ims]
    ids += s("user")["input_ids"]
    state = br.start(ids[:2])
    for t in ids[2:]:
        br.step(state, t)
    g = tok("gpt2")
    assert (
        state.ids
        == g("Hello there")["input_ids"]
        + [50256]
        + g(" General")["input_ids"]
        + g("user")["input_ids"]
    )
    assert state.ids == br.reference(ids)


# ---- the engine --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair():
    base, btok = tiny_model("qwen2", "gpt2", seed=1)
    # a value whose logits move the argmax (so a stale value cache changes the tokens)
    value, vtok = tiny_model("llama", "smollm2", seed=2, initializer_range=0.5)
    return (base, btok), (value, vtok)


def naive_bridged(model: IVLModel, ids: list[int], params: SamplingParams) -> list[int]:
    """Re-encode the whole text for the value model and recompute both models, every step."""
    seq, out = list(ids), []
    with torch.inference_mode():
        for step in range(params.max_new_tokens):
            zb = model.base(input_ids=torch.tensor([seq]), use_cache=False).logits[:, -1]
            v_ids = model.bridge.reference(seq)
            zv = model.value(input_ids=torch.tensor([v_ids]), use_cache=False).logits[:, -1]
            t, _ = ivl.merge_sample(
                zb,
                zv,
                alpha=float(params.alpha),
                vocab_map=model.vocab_map,
                vocab_limit=model.vocab_limit,
                temperature=float(params.temperature),
                seed=params.seed,
                step=step,
            )
            seq.append(int(t))
            out.append(int(t))
    return out


PROMPTS = ["Hello, my name is", "def f(x):\n   ", "日本語 and  spaces", "1 2 3"]


def test_bridged_engine_equals_naive_reencode_loop(pair):
    model = IVLModel.from_pretrained(pair[0], pair[1], vocab_map="auto")
    assert model.bridge is not None
    engine = IVLEngine(model, max_batch=3, max_len=64)
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True, seed=3)
    results = engine.generate_many(PROMPTS, params)
    for prompt, res in zip(PROMPTS, results, strict=True):
        assert res.error is None
        ids = model.encode(prompt)
        assert res.token_ids == naive_bridged(model, ids, params), prompt
    st = engine.bridge_stats
    assert st["steps"] > 0 and st["fed"] >= st["steps"]
    print(f"\nvalue tokens fed per base token: {st['fed'] / st['steps']:.2f}")


def test_bridged_sampling_equals_naive(pair):
    model = IVLModel.from_pretrained(pair[0], pair[1], vocab_map="auto")
    engine = IVLEngine(model, max_batch=2, max_len=64)
    params = [
        SamplingParams(temperature=1.0, max_new_tokens=10, ignore_eos=True, seed=s, alpha=a)
        for s, a in ((5, 1.0), (6, 0.5), (7, 2.0))
    ]
    results = engine.generate_many(PROMPTS[:3], params)
    for prompt, p, res in zip(PROMPTS[:3], params, results, strict=True):
        assert res.token_ids == naive_bridged(model, model.encode(prompt), p)


def test_bridged_alpha_zero_equals_base_alone(pair):
    bridged = IVLEngine(IVLModel.from_pretrained(pair[0], pair[1], vocab_map="auto"), max_len=64)
    alone = IVLEngine(IVLModel.from_pretrained(pair[0]), max_len=64)
    params = SamplingParams(temperature=0.8, max_new_tokens=10, ignore_eos=True, seed=11, alpha=0.0)
    mixed = [params, SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True, seed=1)]
    a = bridged.generate_many(PROMPTS[:2], mixed)
    b = alone.generate_many(PROMPTS[:1], [params])
    assert a[0].token_ids == b[0].token_ids
    # the other row of the same batch (alpha = 1) is bridged correctly
    model = bridged.model
    assert a[1].token_ids == naive_bridged(model, model.encode(PROMPTS[1]), mixed[1])


def test_different_tokenizers_need_a_map(pair):
    with pytest.raises(ValueError, match="ivl vocab build"):
        IVLModel.from_pretrained(pair[0], pair[1])
    with pytest.raises(ValueError, match="residual"):
        IVLModel.from_pretrained(pair[0], pair[1], vocab_map="auto", scheme="cascade")


def test_unbridged_paths_refuse_a_vocabulary_map_pair(pair):
    from ivl.engine.hf import IVLLogitsProcessor
    from ivl.engine.naive import naive_generate

    model = IVLModel.from_pretrained(pair[0], pair[1], vocab_map="auto")
    with pytest.raises(ValueError, match="another tokenizer"):
        IVLLogitsProcessor(model)
    with pytest.raises(ValueError, match="another tokenizer"):
        naive_generate(model, [1, 2], SamplingParams(max_new_tokens=2, seed=0))


def test_bridged_value_cache_overflow_finishes_request(pair):
    model = IVLModel.from_pretrained(pair[0], pair[1], vocab_map="auto")
    engine = IVLEngine(model, max_batch=2, max_len=64, value_max_len=12)
    params = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True, seed=0)
    short, long = engine.generate_many(["Hi", "word " * 20], params)
    assert long.error is not None and "value_max_len" in long.error
    assert short.finish_reason == "length" and 0 < len(short.token_ids) <= 40


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_cache_extend_crop_per_row(arch):
    """Rows fed different numbers of tokens after different crops match an uncached forward."""
    from ivl.engine.cache import PairedKVCache

    model, _ = tiny_model(arch, "gpt2", seed=4, dtype=torch.float32)
    cache = PairedKVCache({"value": model}, max_batch=3, max_len=40, unaligned={"value": 40})
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (9, 5, 20)]
    for slot, s in enumerate(seqs):
        cache.prefill("value", slot, torch.tensor(s))
        cache.crop("value", slot, len(s))
    # roll rows back by different amounts and feed different numbers of new tokens
    new_rows = [[11, 12, 13], [14], [15, 16, 17, 18, 19]]
    keep = [7, 5, 18]
    for slot, k in enumerate(keep):
        cache.crop("value", slot, k)
    with torch.inference_mode():
        got = cache.extend("value", 3, new_rows)
        for slot, (s, k, new) in enumerate(zip(seqs, keep, new_rows, strict=True)):
            full = torch.tensor([s[:k] + new])
            want = model(input_ids=full, use_cache=False).logits[0, -1]
            torch.testing.assert_close(got[slot], want, rtol=1e-4, atol=1e-4)
            assert cache.length("value", slot) == k + len(new)
        # and once more after the first extend, one token each
        got = cache.extend("value", 3, [[21], [22], [23]])
        for slot, (s, k, new) in enumerate(zip(seqs, keep, new_rows, strict=True)):
            full = torch.tensor([s[:k] + new + [21 + slot]])
            want = model(input_ids=full, use_cache=False).logits[0, -1]
            torch.testing.assert_close(got[slot], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_batched_prefill_rows_match_uncached_forward(arch):
    """prefill_rows: prompts of different lengths, right-padded in one forward from slot 1 on,
    give each row's last logits and a cache that decodes like an uncached forward."""
    from ivl.engine.cache import PairedKVCache

    model, _ = tiny_model(arch, "gpt2", seed=5, dtype=torch.float32)
    cache = PairedKVCache({"base": model}, max_batch=4, max_len=32)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (6, 13, 1)]
    with torch.inference_mode():
        (got,) = cache.prefill_rows(["base"], 1, prompts)
        for r, p in enumerate(prompts):
            want = model(input_ids=torch.tensor([p]), use_cache=False).logits[0, -1]
            torch.testing.assert_close(got[r], want, rtol=1e-4, atol=1e-4)
            cache.assign(1 + r, len(p))
        cache.assign(0, 1)  # slot 0: an unrelated request, one token cached (never written)
        nxt = torch.tensor([7, 8, 9, 10])
        out = cache.decode("base", 4, nxt)
        for r, p in enumerate(prompts):
            full = torch.tensor([[*p, int(nxt[1 + r])]])
            want = model(input_ids=full, use_cache=False).logits[0, -1]
            torch.testing.assert_close(out[1 + r], want, rtol=1e-4, atol=1e-4)
