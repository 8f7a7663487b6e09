"""Engine tests on tiny random models with real tokenizers (fast suite).

References: HF ``generate`` of the base alone (alpha = 0), and the no-cache recompute loop
``ivl.engine.naive.naive_generate`` (alpha != 0, cascade, proxy-tuning), which shares the
sampling RNG contract, so sampled tokens are compared exactly too.
"""

from __future__ import annotations

import json

import pytest
import torch

from ivl.engine import IVLEngine, IVLModel, Result, SamplingParams
from ivl.engine.naive import naive_generate
from ivl.engine.params import derive_seed

# Untied heads and a larger init make tiny random models produce varied tokens (a tied tiny model
# mostly repeats its input token, which would make every comparison trivially true).
KW = {
    "llama": dict(initializer_range=0.5),
    "qwen2": dict(initializer_range=0.2),
    "gemma3": dict(tie_word_embeddings=False, initializer_range=0.2),  # sliding window 16
}
PROMPTS = [
    "The quick brown fox jumps over the lazy dog, and then the dog chased the fox back home.",
    "Hi",
    "Once upon a time",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "A",
]


def _tiny(arch: str, seed: int):
    from ivl.models.tiny import tiny_model

    return tiny_model(arch, "gpt2", seed=seed, **KW[arch])


def tiny_pairs(device: str = "cpu"):
    """get(arch) -> (base, value, tokenizer): two tiny random models on ``device``, made once."""
    cache: dict = {}

    def get(arch: str):
        if arch not in cache:
            base, tok = _tiny(arch, 0)
            value, _ = _tiny(arch, 1)
            cache[arch] = (base.to(device), value.to(device), tok)
        return cache[arch]

    return get


@pytest.fixture(scope="module")
def pairs():
    return tiny_pairs()


@pytest.fixture(scope="module")
def llama(pairs):
    base, value, tok = pairs("llama")
    return IVLModel.from_pretrained((base, tok), (value, tok))


def _ids(model: IVLModel, prompt: str) -> list[int]:
    return model.encode(prompt)


# ---- SamplingParams ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(temperature=-1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(min_p=2.0), "min_p"),
        (dict(alpha=float("inf")), "alpha"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(seed=2**64), "seed"),
        (dict(stop=[""]), "stop"),
        (dict(stop_token_ids=[-3]), "stop_token_ids"),
    ],
)
def test_sampling_params_rejects(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kwargs)


def test_sampling_params_types():
    with pytest.raises(TypeError, match="top_k"):
        SamplingParams(top_k=1.5)
    assert SamplingParams(stop="###").stop == ("###",)
    assert derive_seed(0) != derive_seed(1)
    assert -(2**63) <= derive_seed(12345, 99) < 2**63


# ---- references -------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_alpha0_greedy_matches_hf_generate(pairs, arch):
    base, value, tok = pairs(arch)
    model = IVLModel.from_pretrained((base, tok), (value, tok))
    engine = IVLEngine(model, max_batch=2, max_len=96)
    params = SamplingParams(temperature=0, alpha=0, max_new_tokens=24, ignore_eos=True)
    results = engine.generate_many(PROMPTS[:3], params)
    for prompt, res in zip(PROMPTS[:3], results, strict=True):
        enc = tok(prompt, return_tensors="pt")
        hf = base.generate(**enc, max_new_tokens=24, do_sample=False, min_new_tokens=24)
        assert res.token_ids == hf[0, enc.input_ids.shape[1] :].tolist(), prompt
        assert res.finish_reason == "length"


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_alpha1_greedy_matches_naive_recompute(pairs, arch):
    base, value, tok = pairs(arch)
    model = IVLModel.from_pretrained((base, tok), (value, tok))
    engine = IVLEngine(model, max_batch=2, max_len=96)  # 5 prompts through 2 slots
    params = SamplingParams(temperature=0, max_new_tokens=14, seed=3)
    results = engine.generate_many(PROMPTS, params)
    for prompt, res in zip(PROMPTS, results, strict=True):
        assert res.token_ids == naive_generate(model, _ids(model, prompt), params), prompt


def test_sampled_matches_naive_and_is_batch_independent(llama):
    params = [
        SamplingParams(temperature=1.0, max_new_tokens=10, seed=11),
        SamplingParams(temperature=0.7, top_k=50, max_new_tokens=9, seed=12, alpha=0.5),
        SamplingParams(temperature=1.3, top_p=0.9, max_new_tokens=10, seed=13, alpha=0),
        SamplingParams(temperature=0.9, min_p=0.05, max_new_tokens=5, seed=14, alpha=2.0),
        SamplingParams(temperature=1.0, max_new_tokens=12, seed=15, logprobs=True),
    ]
    alone = [
        IVLEngine(llama, max_batch=1, max_len=96).generate_many([pr], [p])[0]
        for pr, p in zip(PROMPTS, params, strict=True)
    ]
    for pr, p, res in zip(PROMPTS, params, alone, strict=True):
        assert res.token_ids == naive_generate(llama, _ids(llama, pr), p)
        assert len(res.token_ids) <= p.max_new_tokens
    for max_batch, order in ((5, [0, 1, 2, 3, 4]), (3, [4, 2, 0, 3, 1]), (2, [3, 1, 4, 0, 2])):
        engine = IVLEngine(llama, max_batch=max_batch, max_len=96)
        got = engine.generate_many([PROMPTS[i] for i in order], [params[i] for i in order])
        for j, i in enumerate(order):
            assert got[j].token_ids == alone[i].token_ids, (max_batch, order, i)
            assert got[j].text == alone[i].text
    lp = alone[4].logprobs
    assert lp is not None and len(lp) == len(alone[4].token_ids)
    assert all(x <= 0 for x in lp)
    assert alone[0].logprobs is None


def test_derived_seeds_are_reproducible(llama):
    engine = IVLEngine(llama, max_batch=2, max_len=64, seed=7)
    params = SamplingParams(temperature=1.0, max_new_tokens=6)
    a = engine.generate_many(PROMPTS[:3], params)
    b = IVLEngine(llama, max_batch=3, max_len=64, seed=7).generate_many(PROMPTS[:3], params)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.seed for r in a] == [derive_seed(i, 7) for i in range(3)]


# ---- stops, lengths, streaming ----------------------------------------------------------------
def test_stop_string_spanning_tokens_and_stream(llama):
    engine = IVLEngine(llama, max_batch=2, max_len=96)
    greedy = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)
    ref = engine.generate(PROMPTS[0], greedy)
    tok = llama.tokenizer
    # a stop string made of the end of token 5 and the start of token 6
    t5 = tok.decode(ref.token_ids[5:6])
    t6 = tok.decode(ref.token_ids[6:7])
    assert len(t5) >= 1 and len(t6) >= 1
    stop = t5[-1:] + t6[:1]
    cut = ref.text.find(stop)
    assert cut >= 0
    params = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True, stop=[stop])
    res = engine.generate(PROMPTS[0], params)
    assert res.finish_reason == "stop" and res.text == ref.text[:cut]
    assert stop not in res.text
    # streaming: deltas join to the final text and every request ends exactly once
    streamed: dict[int, str] = {}
    ends: list[Result] = []
    for event in engine.stream([PROMPTS[0], PROMPTS[2]], [params, greedy]):
        rid, token, delta = event
        streamed[rid] = streamed.get(rid, "") + delta
        assert (token is None) == (event.result is not None)
        if event.result is not None:
            ends.append(event.result)
    assert sorted(r.request_id for r in ends) == [0, 1]
    for r in ends:
        assert streamed[r.request_id] == r.text


def test_stop_token_ids_and_max_new_tokens(llama):
    engine = IVLEngine(llama, max_batch=3, max_len=96)
    greedy = SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)
    ref = engine.generate(PROMPTS[2], greedy)
    stop_tok = ref.token_ids[4]
    first = ref.token_ids.index(stop_tok)
    res = engine.generate(
        PROMPTS[2], SamplingParams(temperature=0, max_new_tokens=20, stop_token_ids=[stop_tok])
    )
    assert res.finish_reason == "stop" and res.token_ids == ref.token_ids[:first]
    budgets = [1, 7, 3, 12, 2]
    results = engine.generate_many(
        PROMPTS, [SamplingParams(max_new_tokens=b, ignore_eos=True, seed=1) for b in budgets]
    )
    assert [len(r.token_ids) for r in results] == budgets
    assert all(r.finish_reason == "length" for r in results)


def test_cache_full_ends_with_length(llama):
    engine = IVLEngine(llama, max_batch=2, max_len=12)
    ids = _ids(llama, PROMPTS[2])  # 4 tokens
    res = engine.generate(ids, SamplingParams(temperature=0, max_new_tokens=50, ignore_eos=True))
    # positions 0..11 can be fed: the prompt's 4 and 8 generated, plus one more sampled at the end
    assert res.finish_reason == "length" and len(res.token_ids) == 12 - len(ids) + 1
    full = naive_generate(llama, ids, SamplingParams(temperature=0, max_new_tokens=9, seed=0))
    assert res.token_ids == full


# ---- failures stay local ----------------------------------------------------------------------
def test_bad_requests_fail_alone(llama):
    engine = IVLEngine(llama, max_batch=2, max_len=32)
    long_prompt = " ".join(["word"] * 40)
    prompts = [PROMPTS[1], long_prompt, "", PROMPTS[2], [10**7], PROMPTS[4]]
    params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    results = engine.generate_many(prompts, params)
    assert [r.ok for r in results] == [True, False, False, True, False, True]
    assert "max_len" in results[1].error and "40 tokens" in results[1].error
    assert "empty prompt" in results[2].error
    assert "out of range" in results[4].error
    for i in (0, 3, 5):
        alone = IVLEngine(llama, max_batch=1, max_len=32).generate(prompts[i], params)
        assert results[i].token_ids == alone.token_ids and len(alone.token_ids) == 6
    with pytest.raises(ValueError, match="max_len"):
        engine.generate(long_prompt, params)


def test_nan_value_fails_only_its_request(pairs):
    base, _, tok = pairs("qwen2")
    bad_value, _ = _tiny("qwen2", 2)
    with torch.no_grad():
        bad_value.lm_head.weight.fill_(float("nan"))
    model = IVLModel.from_pretrained((base, tok), (bad_value, tok))
    engine = IVLEngine(model, max_batch=3, max_len=64)
    p0 = SamplingParams(temperature=0, alpha=0, max_new_tokens=5, ignore_eos=True)
    p1 = SamplingParams(temperature=0, alpha=1, max_new_tokens=5, ignore_eos=True)
    results = engine.generate_many(PROMPTS[:3], [p0, p1, p0])
    assert [r.finish_reason for r in results] == ["length", "error", "length"]
    assert "NaN" in results[1].error
    enc = tok(PROMPTS[0], return_tensors="pt")
    hf = base.generate(**enc, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert results[0].token_ids == hf[0, enc.input_ids.shape[1] :].tolist()


# ---- the paired cache -------------------------------------------------------------------------
def test_value_forward_skipped_when_all_alpha_zero(llama):
    calls = {"value": 0}

    def hook(*_):
        calls["value"] += 1

    handle = llama.value.register_forward_hook(hook)
    try:
        engine = IVLEngine(llama, max_batch=2, max_len=64)
        engine.generate_many(PROMPTS[:3], SamplingParams(alpha=0, max_new_tokens=4, seed=0))
        assert calls["value"] == 0
        engine.generate_many(
            PROMPTS[:2],
            [SamplingParams(alpha=0, max_new_tokens=4), SamplingParams(max_new_tokens=2)],
        )
        assert calls["value"] > 0
    finally:
        handle.remove()


def test_caches_allocated_once(llama):
    engine = IVLEngine(llama, max_batch=2, max_len=48)
    engine.generate_many(PROMPTS, SamplingParams(max_new_tokens=5, seed=0))
    ptrs = {
        name: [layer.keys.data_ptr() for layer in cache.layers]
        for name, cache in engine.cache.caches.items()
    }
    shapes = {tuple(engine.cache.caches["base"].layers[0].keys.shape)}
    engine.generate_many(PROMPTS[::-1], SamplingParams(max_new_tokens=9, seed=1))
    assert ptrs == {
        name: [layer.keys.data_ptr() for layer in cache.layers]
        for name, cache in engine.cache.caches.items()
    }
    assert shapes == {(2, 2, 48 + 1, 16)}  # + the scratch column of batched prefills
    assert engine.cache.nbytes() > 0


# ---- model construction -----------------------------------------------------------------------
def test_vocab_checks(pairs, tmp_path):
    from transformers import AutoModelForCausalLM

    from ivl.models.tiny import tiny_config

    base, value, tok = pairs("llama")
    # same tokenizer, value matrix padded past the tokenizer: identity map, ids < len(tok)
    cfg = tiny_config("llama", vocab_size=len(tok) + 13, initializer_range=0.5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        padded = AutoModelForCausalLM.from_config(cfg).eval()
    model = IVLModel.from_pretrained((base, tok), (padded, tok))
    assert model.vocab_map is not None and model.vocab_limit == len(tok)
    params = SamplingParams(temperature=0, max_new_tokens=8, seed=0, ignore_eos=True)
    res = IVLEngine(model, max_batch=1, max_len=64).generate(PROMPTS[2], params)
    assert res.token_ids == naive_generate(model, _ids(model, PROMPTS[2]), params)
    # a different tokenizer with no map: the error names `ivl vocab build`
    from ivl.models.tiny import tiny_model

    other, other_tok = tiny_model("llama", "smollm2", seed=0)
    with pytest.raises(ValueError, match="ivl vocab build"):
        IVLModel.from_pretrained((base, tok), (other, other_tok))
    with pytest.raises(ValueError, match="tokenizer"):
        IVLModel.from_pretrained(base, value)
    with pytest.raises(ValueError, match="unknown scheme"):
        IVLModel.from_pretrained((base, tok), (value, tok), scheme="nope")


def test_scheme_read_from_ivl_json(tmp_path):
    from ivl.models.tiny import save_tiny

    folder = save_tiny(tmp_path / "value", "llama", "gpt2", seed=1)
    (folder / "ivl.json").write_text(json.dumps({"scheme": "cascade"}))
    base = save_tiny(tmp_path / "base", "llama", "gpt2", seed=0)
    with pytest.raises(ValueError, match="trained with scheme 'cascade'"):
        IVLModel.from_pretrained(str(base), str(folder))
    model = IVLModel.from_pretrained(str(base), str(folder), scheme="cascade")
    assert model.scheme == "cascade" and model.value is not None


@pytest.mark.parametrize("scheme", ["cascade", "cascade_no_text", "proxy"])
def test_other_schemes_match_naive(pairs, scheme):
    base, value, tok = pairs("llama")
    anti = None
    if scheme == "proxy":
        anti_m, _ = _tiny("llama", 3)
        anti = (anti_m, tok)
    model = IVLModel.from_pretrained((base, tok), (value, tok), scheme=scheme, anti_expert=anti)
    engine = IVLEngine(model, max_batch=2, max_len=64)
    params = [
        SamplingParams(temperature=0, max_new_tokens=10, seed=1, ignore_eos=True),
        SamplingParams(temperature=1.0, max_new_tokens=10, seed=2, ignore_eos=True, alpha=0.7),
        SamplingParams(temperature=0, max_new_tokens=6, seed=3, ignore_eos=True, alpha=0),
    ]
    results = engine.generate_many(PROMPTS[:3], params)
    for pr, p, res in zip(PROMPTS[:3], params, results, strict=True):
        assert res.token_ids == naive_generate(model, _ids(model, pr), p), (scheme, pr)


@pytest.mark.parametrize("scheme", ["residual", "proxy"])
def test_parallel_forwards_run_side_by_side_with_the_same_tokens(pairs, scheme):
    import threading

    base, value, tok = pairs("llama")
    anti = (_tiny("llama", 3)[0], tok) if scheme == "proxy" else None
    model = IVLModel.from_pretrained((base, tok), (value, tok), scheme=scheme, anti_expert=anti)
    threads: dict[str, set] = {"base": set(), "value": set()}
    hooks = [
        m.register_forward_hook(lambda *_, k=k: threads[k].add(threading.current_thread().name))
        for k, m in (("base", model.base), ("value", model.value))
    ]
    params = [
        SamplingParams(temperature=0, max_new_tokens=8, seed=4, ignore_eos=True),
        SamplingParams(temperature=1.0, max_new_tokens=8, seed=5, ignore_eos=True, alpha=0.5),
    ]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # the pool splits the caller's threads: two to split
        side = IVLEngine(model, max_batch=2, max_len=64)
        seq = IVLEngine(model, max_batch=2, max_len=64, parallel_forwards=False)
        assert side._pool is not None and seq._pool is None
        got = side.generate_many(PROMPTS[:2], params)
        assert any(n.startswith("ivl-forward") for n in threads["value"] | threads["base"])
        assert torch.get_num_threads() == 2  # the caller's count is untouched
        want = seq.generate_many(PROMPTS[:2], params)
    finally:
        torch.set_num_threads(before)
        for h in hooks:
            h.remove()
    for pr, p, g, w in zip(PROMPTS[:2], params, got, want, strict=True):
        assert g.token_ids == w.token_ids == naive_generate(model, _ids(model, pr), p)


def test_no_pool_where_forwards_depend_on_each_other(pairs):
    base, value, tok = pairs("llama")
    model = IVLModel.from_pretrained((base, tok), (value, tok), scheme="cascade")
    assert IVLEngine(model, max_batch=1, max_len=32, parallel_forwards=True)._pool is None
