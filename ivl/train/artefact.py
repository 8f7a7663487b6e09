"""The saved value network: a plain HF causal-LM folder (its logits are z_value) + ``ivl.json``.

``ivl.json`` fields: ``format`` (1), ``scheme``, ``alpha`` (default value strength, 1.0),
``tokenizer`` (``{"fingerprint", "vocab_size"}``: sha256 of the sorted vocabulary and the special
tokens), ``training_base`` (name or path, and its fingerprint), ``norm`` (``{"lambda", "masked"}``),
``data`` (``{"fingerprint", "examples", "source"}``), ``value_init``, ``train`` (the config),
``tokens_seen`` (all tokens of the demonstrations trained on) and ``wall_s`` (seconds of training,
summed over resumed runs).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ivl._fs import atomic_write_text

IVL_JSON = "ivl.json"
FORMAT = 1


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary (token -> id) and its special tokens."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    blob = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def write_ivl_json(folder: str | os.PathLike[str], meta: dict[str, Any]) -> Path:
    text = json.dumps({"format": FORMAT, **meta}, indent=2, sort_keys=True) + "\n"
    return atomic_write_text(Path(folder) / IVL_JSON, text)


def read_ivl_json(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata of a saved value network (raises ValueError if the folder has none)."""
    path = Path(folder) / IVL_JSON
    if not path.is_file():
        raise ValueError(f"{folder} is not an ivl value network (no {IVL_JSON})")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported format {meta.get('format')!r} (expected {FORMAT})")
    return meta
