"""train_value on tiny models: loss goes down, exact resume, artefact, early errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from ivl.models.tiny import save_tiny
from ivl.train.artefact import read_ivl_json, tokenizer_fingerprint
from ivl.train.trainer import TrainConfig, train_value

RECS = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(24)]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("base") / "b", "llama", "gpt2", seed=1)


def _cfg(out, **kw):
    kw = {
        "out_dir": str(out),
        "epochs": 1,
        "batch_size": 4,
        "grad_accum": 2,
        "lr": 3e-3,
        "progress": False,
        **kw,
    }
    return TrainConfig(**kw)


def _metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_tiny_run_lowers_loss_and_saves_artefact(base_dir, tmp_path, default_modes_check):
    from transformers import AutoModelForCausalLM

    out = train_value(
        str(base_dir), "first-1-layers", RECS, _cfg(tmp_path / "o", epochs=4, eval_fraction=0.25)
    )
    rows = _metrics(out)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 * 3  # 18 train examples, global batch 8 -> 3 steps/epoch
    assert losses[-1] < losses[0] - 0.5
    base_ce = next(r["eval_base_ce"] for r in rows if "eval_base_ce" in r)
    assert rows[-1]["eval_ce"] < base_ce
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert model.config.num_hidden_layers == 1
    meta = read_ivl_json(out)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert meta["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tok)
    assert meta["scheme"] == "residual" and meta["alpha"] == 1.0
    assert meta["norm"] == {"lambda": 1.0, "masked": False}
    assert len(meta["data"]["fingerprint"]) == 64
    # no leftovers of atomic writes
    assert not [p for p in out.rglob(".tmp*")]
    default_modes_check(out)  # weights and checkpoints shareable, not safetensors' 0600


class _Killed(Exception):
    pass


def test_resume_is_exact(base_dir, tmp_path):
    kw = dict(epochs=2, save_every=2, grad_accum=1, batch_size=3, warmup_ratio=0.2)
    full = train_value(str(base_dir), "random", RECS[:12], _cfg(tmp_path / "full", **kw))

    def kill(row):
        if row["step"] == 5:
            raise _Killed

    with pytest.raises(_Killed):
        train_value(
            str(base_dir), "random", RECS[:12], _cfg(tmp_path / "cut", **kw), callbacks=[kill]
        )
    assert (tmp_path / "cut" / "checkpoints" / "step-0000004").is_dir()
    assert not (tmp_path / "cut" / "ivl.json").exists()
    with pytest.raises(ValueError, match="already holds a training run"):
        train_value(str(base_dir), "random", RECS[:12], _cfg(tmp_path / "cut", **kw))
    resumed = train_value(
        str(base_dir), "random", RECS[:12], _cfg(tmp_path / "cut", resume=True, **kw)
    )
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = [r["loss"] for r in _metrics(full) if "loss" in r]
    lb = [r["loss"] for r in _metrics(resumed) if "loss" in r]
    assert la == lb
    # the budget covers the whole run, not just the part after the resume
    ma, mb = (json.loads((d / "ivl.json").read_text()) for d in (full, resumed))
    assert ma["tokens_seen"] == mb["tokens_seen"] > 0 and mb["wall_s"] > 0


def test_unwritable_out_dir(base_dir, tmp_path):
    if os.geteuid() == 0:
        target = "/proc/ivl-cannot-write-here"  # root ignores permission bits
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = str(ro / "out")
    with pytest.raises(PermissionError, match="not writable"):
        train_value(str(base_dir), "random", RECS, _cfg(target))


def test_early_errors(base_dir, tmp_path):
    other = save_tiny(tmp_path / "other", "llama", "smollm2", seed=3)
    with pytest.raises(ValueError, match="different tokenizer"):
        train_value(str(base_dir), str(other), RECS, _cfg(tmp_path / "a"))
    with pytest.raises(ValueError, match="different tokenizer"):  # cut from another family
        train_value(str(base_dir), f"first-1-layers:{other}", RECS, _cfg(tmp_path / "a"))
    with pytest.raises(ValueError, match="neither a zoo model"):
        train_value(
            str(base_dir), f"first-1-layers:{tmp_path / 'nope'}", RECS, _cfg(tmp_path / "a")
        )
    with pytest.raises(ValueError, match="item 1: missing field"):
        train_value(str(base_dir), "random", [RECS[0], {"prompt": "x"}], _cfg(tmp_path / "b"))
    with pytest.raises(ValueError, match="5 layers requested: the model has 2 layers"):
        train_value(str(base_dir), "first-5-layers", RECS, _cfg(tmp_path / "c"))
    with pytest.raises(ValueError, match="unknown scheme"):
        train_value(str(base_dir), "random", RECS, _cfg(tmp_path / "d", scheme="nope"))


def test_random_n_layers_value(base_dir):
    from ivl.models.loading import load_model
    from ivl.train.trainer import build_value

    base = load_model(str(base_dir))
    a = build_value("random-1-layers", base, str(base_dir), seed=7)
    b = build_value("random-1-layers", base, str(base_dir), seed=7)
    c = build_value("random-1-layers", base, str(base_dir), seed=8)
    assert a.config.num_hidden_layers == 1 and base.config.num_hidden_layers == 2
    emb = "model.embed_tokens.weight"
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # a function of the seed alone
    assert not torch.equal(sa[emb], sc[emb])
    assert not torch.equal(sa[emb], base.state_dict()[emb])  # fresh, not copied from the base
    with pytest.raises(ValueError, match="3 layers requested: the model has 2 layers"):
        build_value("random-3-layers", base, str(base_dir))


def _encoder_decoder_folder(path):
    """A tiny T5 (encoder-decoder: not a causal LM) with a tokenizer."""
    from transformers import T5Config, T5Model

    from ivl.models.tiny import load_real_tokenizer

    tok = load_real_tokenizer("gpt2")
    cfg = T5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    model = T5Model(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


def test_not_a_causal_lm_fails_before_any_work(base_dir, tmp_path):
    t5, tok = _encoder_decoder_folder(tmp_path / "t5")
    consumed = []

    def records():  # the data must not even be read
        consumed.append(1)
        yield from RECS

    with pytest.raises(ValueError, match=r"base: .*'t5' model .*not a causal language model"):
        train_value(str(tmp_path / "t5"), "random", records(), _cfg(tmp_path / "a"))
    with pytest.raises(ValueError, match=r"base: T5Model is not a causal LM"):
        train_value(t5, "random", records(), _cfg(tmp_path / "b"), tokenizer=tok)
    with pytest.raises(ValueError, match=r"value_init: .*not a causal language model"):
        train_value(str(base_dir), str(tmp_path / "t5"), records(), _cfg(tmp_path / "c"))
    assert not consumed


def test_all_masked_record_fails_before_models_load(tmp_path):
    # A base folder whose weights cannot be read: reaching the model load would fail differently.
    base = save_tiny(tmp_path / "b", "llama", "gpt2", seed=1)
    (base / "model.safetensors").write_bytes(b"not safetensors")
    recs = [RECS[0], {"prompt": "word " * 60, "response": "x"}]
    with pytest.raises(ValueError, match=r"item 1: no supervised .*after truncation"):
        train_value(str(base), "random", recs, _cfg(tmp_path / "o", max_length=16))
