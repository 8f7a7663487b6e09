"""HF integration (IVLLogitsProcessor) and the `ivl generate` command, on tiny models."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest

from ivl.engine import IVLEngine, IVLModel, SamplingParams
from ivl.engine.hf import IVLLogitsProcessor

PROMPTS = ["The quick brown fox jumps over the lazy dog and then", "Hi", "Once upon a time"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from ivl.models.tiny import save_tiny

    root = tmp_path_factory.mktemp("engine_cli")
    base = save_tiny(root / "base", "qwen2", "gpt2", seed=0, initializer_range=0.2)
    value = save_tiny(root / "value", "qwen2", "gpt2", seed=1, initializer_range=0.2)
    return base, value


@pytest.fixture(scope="module")
def model(folders):
    base, value = folders
    return IVLModel.from_pretrained(str(base), str(value))


@pytest.mark.parametrize("alpha", [0.8, 0.0])
def test_logits_processor_matches_engine(model, alpha):
    tok, base = model.tokenizer, model.base
    params = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True, alpha=alpha)
    expected = IVLEngine(model, max_batch=3, max_len=64).generate_many(PROMPTS, params)
    tok.pad_token, tok.padding_side = tok.eos_token, "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    proc = IVLLogitsProcessor(model, alpha=alpha, attention_mask=enc.attention_mask)
    kw = dict(do_sample=False, max_new_tokens=10, min_new_tokens=10, pad_token_id=tok.eos_token_id)
    for _ in range(2):  # the processor resets itself for a new generation
        out = base.generate(**enc, logits_processor=[proc], **kw)
        for i, res in enumerate(expected):
            assert out[i, enc.input_ids.shape[1] :].tolist() == res.token_ids
    # one prompt, no padding
    enc1 = tok(PROMPTS[0], return_tensors="pt")
    out = base.generate(**enc1, logits_processor=[IVLLogitsProcessor(model, alpha=alpha)], **kw)
    assert out[0, enc1.input_ids.shape[1] :].tolist() == expected[0].token_ids


def test_logits_processor_needs_value(model):
    alone = IVLModel(model.base, model.tokenizer)
    with pytest.raises(ValueError, match="value model"):
        IVLLogitsProcessor(alone)


def _cli(argv):
    from ivl.engine.cli import register

    parser = argparse.ArgumentParser(prog="ivl")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_file_mode(folders, model, tmp_path, capsys):
    base, value = folders
    src, dst = tmp_path / "in.jsonl", tmp_path / "out" / "res.jsonl"
    lines = [
        {"id": "a", "prompt": PROMPTS[0]},
        {"id": "b", "prompt": PROMPTS[1], "max_new_tokens": 3, "alpha": 0.0},
        {"id": "c", "prompt": ""},
    ]
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    argv = ["generate", "--base", str(base), "--value", str(value), "--input", str(src)]
    argv += ["--output", str(dst), "--max-new-tokens", "6", "--ignore-eos", "-q"]
    assert _cli(argv) == 0
    out = [json.loads(x) for x in dst.read_text().splitlines()]
    assert [o["id"] for o in out] == ["a", "b", "c"]
    assert [o["tokens"] for o in out] == [6, 3, 0]
    assert out[2]["finish_reason"] == "error" and "empty prompt" in out[2]["error"]
    engine = IVLEngine(model, max_batch=2, max_len=64)
    ref = engine.generate(
        PROMPTS[0], SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    )
    assert out[0]["text"] == ref.text and out[0]["error"] is None
    assert "wrote 3 results" in capsys.readouterr().out


def test_cli_prompt_streams(folders, model, capsys):
    base, value = folders
    argv = ["generate", "--base", str(base), "--value", str(value), "--prompt", PROMPTS[2]]
    assert _cli([*argv, "--max-new-tokens", "5", "--ignore-eos", "--alpha", "0.5"]) == 0
    engine = IVLEngine(model, max_batch=1, max_len=64)
    ref = engine.generate(
        PROMPTS[2], SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True, alpha=0.5)
    )
    assert capsys.readouterr().out == ref.text + "\n"


def test_cli_user_errors(folders, tmp_path):
    base, _ = folders
    with pytest.raises(ValueError, match="exactly one of --prompt"):
        _cli(["generate", "--base", str(base)])
    with pytest.raises(ValueError, match="--output"):
        _cli(["generate", "--base", str(base), "--input", "x.jsonl"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "temperature": -1}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: temperature"):
        _cli(["generate", "--base", str(base), "--input", str(bad), "--output", "o.jsonl"])
    bad.write_text('{"text": "a"}\n')
    with pytest.raises(ValueError, match="exactly one of"):
        _cli(["generate", "--base", str(base), "--input", str(bad), "--output", "o.jsonl"])
    with pytest.raises(ValueError, match="neither a zoo model"):
        _cli(["generate", "--base", str(tmp_path / "nope"), "--prompt", "x"])


def test_cli_checks_everything_before_loading_weights(folders, tmp_path, monkeypatch):
    """Bad settings, prompts files, folders and maps fail before any model is loaded."""
    import ivl.models.loading

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(ivl.models.loading, "load_model", no_loading)
    base, value = folders
    b, v = str(base), str(value)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        _cli(["generate", "--base", b, "--value", v, "--prompt", "x", "--temperature", "-1"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "top_p": 2}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: top_p"):
        _cli(["generate", "--base", b, "--value", v, "--input", str(bad), "--output", "o.jsonl"])
    with pytest.raises(ValueError, match="neither a zoo model"):
        _cli(["generate", "--base", b, "--value", str(tmp_path / "nope"), "--prompt", "x"])
    with pytest.raises(ValueError, match=r"no config\.json"):
        _cli(["generate", "--base", b, "--value", str(tmp_path), "--prompt", "x"])
    with pytest.raises(ValueError, match="not the folder of a saved map"):
        _cli(["generate", "--base", b, "--value", v, "--vocab-map", str(tmp_path), "--prompt", "x"])
    trained = tmp_path / "cascade-value"
    shutil.copytree(value, trained)
    (trained / "ivl.json").write_text(json.dumps({"scheme": "cascade"}))
    with pytest.raises(ValueError, match="pass scheme='cascade'"):
        _cli(["generate", "--base", b, "--value", str(trained), "--prompt", "x"])
    with pytest.raises(ValueError, match="anti_expert"):
        _cli(["generate", "--base", b, "--value", v, "--scheme", "proxy", "--prompt", "x"])
