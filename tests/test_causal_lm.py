"""IVLForCausalLM (HF generate / pipeline) against the engine, on tiny random models."""

from __future__ import annotations

import pytest
import torch

import ivl
from ivl.engine import IVLEngine, IVLModel, SamplingParams
from ivl.engine.causal_lm import IVLCache, IVLForCausalLM
from ivl.engine.hf import IVLLogitsProcessor

PROMPTS = ["The quick brown fox jumps over the lazy dog and then", "Hi", "Once upon a time"]
NEW = 10


def _tiny(seed: int):
    from ivl.models.tiny import tiny_model

    return tiny_model("qwen2", "gpt2", seed=seed, initializer_range=0.2)


@pytest.fixture(scope="module")
def nets():
    base, tok = _tiny(0)
    value, _ = _tiny(1)
    anti, _ = _tiny(2)
    tok.pad_token, tok.padding_side = tok.eos_token, "left"
    return base, value, anti, tok


def _model(nets, scheme: str) -> IVLModel:
    base, value, anti, tok = nets
    return IVLModel.from_pretrained(
        (base, tok),
        (value, tok),
        scheme=scheme,
        anti_expert=(anti, tok) if scheme == "proxy" else None,
    )


def _engine_tokens(model: IVLModel, alpha: float) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_new_tokens=NEW, ignore_eos=True, alpha=alpha)
    results = IVLEngine(model, max_batch=3, max_len=64).generate_many(PROMPTS, params)
    return [r.token_ids for r in results]


def _hf_kw(tok) -> dict:
    return dict(
        do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=tok.eos_token_id
    )


@pytest.mark.parametrize(
    "scheme, alpha",
    [("residual", 0.8), ("residual", 0.0), ("proxy", 1.0), ("cascade", 1.0)],
)
def test_generate_matches_engine(nets, scheme, alpha, monkeypatch):
    from ivl.engine import concurrent

    model = _model(nets, scheme)
    tok = model.tokenizer
    expected = _engine_tokens(model, alpha)
    lm = IVLForCausalLM(model, alpha=alpha)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)  # left-padded batch
    plen = enc.input_ids.shape[1]
    narrow = []  # the forwards' linears take ivl's narrow kernel on the CPU, as in the engine
    narrow_linear = concurrent._narrow_linear
    monkeypatch.setattr(
        concurrent, "_narrow_linear", lambda x, *a: narrow.append(len(x)) or narrow_linear(x, *a)
    )
    out = lm.generate(**enc, **_hf_kw(tok))
    assert narrow.count(len(PROMPTS)) >= NEW - 1
    assert [out[i, plen:].tolist() for i in range(len(PROMPTS))] == expected
    # no cache: every step recomputes all models over the prefix; same tokens
    out_nc = lm.generate(**enc, use_cache=False, **_hf_kw(tok))
    assert torch.equal(out_nc, out)
    if scheme in ("residual", "proxy"):  # the logits processor (base's own generate) agrees too
        proc = IVLLogitsProcessor(model, alpha=alpha, attention_mask=enc.attention_mask)
        narrow.clear()
        out_p = model.base.generate(**enc, logits_processor=[proc], **_hf_kw(tok))
        assert [out_p[i, plen:].tolist() for i in range(len(PROMPTS))] == expected
        assert narrow.count(len(PROMPTS)) >= NEW - 1  # the value forwards


def test_generate_alpha_per_call_and_base_alone(nets):
    model = _model(nets, "residual")
    tok, base = model.tokenizer, model.base
    lm = IVLForCausalLM(model, alpha=1.0)
    enc = tok(PROMPTS[0], return_tensors="pt")
    plen = enc.input_ids.shape[1]
    # alpha=0 passed to generate: the base alone, i.e. HF generate of the base
    out = lm.generate(**enc, alpha=0.0, **_hf_kw(tok))
    ref = base.generate(**enc, **_hf_kw(tok))
    assert torch.equal(out, ref)
    out1 = lm.generate(**enc, **_hf_kw(tok))
    assert out1[0, plen:].tolist() == _engine_tokens(model, 1.0)[0]
    assert not torch.equal(out1, ref)  # the value model changes the tokens here


def test_forward_logits_and_cache(nets):
    model = _model(nets, "residual")
    lm = IVLForCausalLM(model, alpha=0.5)
    ids = model.tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        out = lm(input_ids=ids, labels=ids)
        zb = model.base(input_ids=ids).logits[0]
        zv = model.value(input_ids=ids).logits[0]
    assert isinstance(out.cache, IVLCache)
    assert set(out.cache.caches) == {"base", "value"}
    assert out.cache.get_seq_length() == ids.shape[1]
    assert all(c.get_seq_length() == ids.shape[1] for c in out.cache.caches.values())
    want = ivl.merge_logits(zb, zv, alpha=0.5, vocab_limit=model.vocab_limit)
    torch.testing.assert_close(out.logits[0], want, rtol=1e-4, atol=1e-4)
    ce = torch.nn.functional.cross_entropy(want[:-1], ids[0, 1:])
    torch.testing.assert_close(out.loss, ce, rtol=1e-4, atol=1e-4)
    # one more token through the returned cache == the last row of a full recompute
    nxt = torch.tensor([[int(want[-1].argmax())]])
    with torch.no_grad():
        step = lm(input_ids=nxt, cache=out.cache, logits_to_keep=1)
        full = lm(input_ids=torch.cat([ids, nxt], 1), use_cache=False)
    assert full.cache is None
    torch.testing.assert_close(step.logits[0, -1], full.logits[0, -1], rtol=1e-4, atol=1e-4)


def test_beam_search_reorders_every_cache(nets):
    # beam search reorders the cache each step; a base-only reorder would desync the value
    model = _model(nets, "proxy")
    tok = model.tokenizer
    lm = IVLForCausalLM(model)
    enc = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    kw = dict(_hf_kw(tok), num_beams=3, early_stopping=True)
    assert torch.equal(lm.generate(**enc, **kw), lm.generate(**enc, use_cache=False, **kw))


def test_pipeline_text_generation(nets):
    import logging

    from transformers import AutoConfig, AutoModelForCausalLM, pipeline

    model = _model(nets, "residual")
    lm = IVLForCausalLM(model, alpha=0.8)
    errors: list[str] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = lambda record: errors.append(record.getMessage())
    hf_logger = logging.getLogger("transformers")  # does not propagate to the root logger
    hf_logger.addHandler(handler)
    try:
        pipe = pipeline("text-generation", model=lm, tokenizer=model.tokenizer)
    finally:
        hf_logger.removeHandler(handler)
    assert not [e for e in errors if "not supported" in e]
    # listing it for the pipeline changes no Auto* lookup
    cfg = AutoConfig.for_model(
        "llama",
        num_hidden_layers=1,
        hidden_size=8,
        intermediate_size=8,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=16,
    )
    assert type(AutoModelForCausalLM.from_config(cfg)).__name__ == "LlamaForCausalLM"
    got = pipe(PROMPTS[2], max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    params = SamplingParams(temperature=0, max_new_tokens=NEW, ignore_eos=True, alpha=0.8)
    expected = IVLEngine(model, max_batch=1, max_len=64).generate(PROMPTS[2], params)
    assert got[0]["generated_text"] == PROMPTS[2] + expected.text


def test_bad_input(nets):
    from transformers import DynamicCache

    model = _model(nets, "residual")
    with pytest.raises(TypeError, match="IVLModel"):
        IVLForCausalLM(model.base)
    lm = IVLForCausalLM(model)
    ids = model.tokenizer(PROMPTS[1], return_tensors="pt").input_ids
    emb = model.base.get_input_embeddings()(ids)
    with pytest.raises(ValueError, match="input_ids"):
        lm(inputs_embeds=emb)
    filled = DynamicCache(config=model.base.config)
    with torch.no_grad():
        model.base(input_ids=ids, cache=filled, use_cache=True)
    with pytest.raises(ValueError, match="IVLCache"):
        lm(input_ids=ids, cache=filled)
    with torch.no_grad():
        out = lm(input_ids=ids, alpha=0.0)  # value skipped: its cache stays empty
        with pytest.raises(ValueError, match="alpha=0"):
            lm(input_ids=ids[:, -1:], cache=out.cache, alpha=1.0)
    with pytest.raises(NotImplementedError, match="from_pretrained"):
        lm.save_pretrained("unused")


def test_from_pretrained_folders(tmp_path):
    from ivl.models.tiny import save_tiny

    base = save_tiny(tmp_path / "base", "llama", "gpt2", seed=0, initializer_range=0.5)
    value = save_tiny(tmp_path / "value", "llama", "gpt2", seed=1, initializer_range=0.5)
    lm = IVLForCausalLM.from_pretrained(str(base), str(value), alpha=0.7)
    assert lm.alpha == 0.7 and lm.ivl.value is not None and lm.tokenizer is lm.ivl.tokenizer
    assert ivl.IVLForCausalLM is IVLForCausalLM
    params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True, alpha=0.7)
    ref = IVLEngine(lm.ivl, max_batch=1, max_len=32).generate(PROMPTS[1], params)
    enc = lm.tokenizer(PROMPTS[1], return_tensors="pt")
    out = lm.generate(**enc, do_sample=False, max_new_tokens=6, min_new_tokens=6)
    assert out[0, enc.input_ids.shape[1] :].tolist() == ref.token_ids


def test_value_with_another_tokenizer_is_refused(nets):
    # a value model on another tokenizer needs its own tokenization of the text (the engine's
    # bridge); IVLForCausalLM feeds it base ids, so it refuses with a pointer to IVLEngine
    from ivl.models.tiny import tiny_model

    base, _, _, tok = nets
    other, other_tok = tiny_model("llama", "smollm2", seed=0)
    model = IVLModel.from_pretrained((base, tok), (other, other_tok), vocab_map="auto")
    with pytest.raises(ValueError, match="IVLEngine"):
        IVLForCausalLM(model)
