"""``VocabMap``: which value-vocabulary column (and weight) each base token reads.

The merge (METHOD.md section 4, ``ivl.ops.reference``) is, for base token b::

    z[b] = z_base[b] + alpha * weight[b] * z_value[index[b]]     (index[b] >= 0)
    z[b] = z_base[b] + alpha * fill                               (index[b] == -1, unmapped)

so a map is two O(V_base) tensors: ``index`` int64 [V_base] and ``weight`` fp32 [V_base], handed
to the fused op as they are. Stored as ``vocab_map.safetensors`` (the tensors) plus
``vocab_map.json`` (kind, both tokenizers' fingerprints and sizes, build statistics) in one
folder, written atomically. Loading with tokenizers whose fingerprints differ from the stored
ones is an error.

Kinds (see :func:`build_map`): ``identity``/``padded`` (same tokenizer), ``exact`` (same bytes),
``dtw`` (the authors' corpus alignment, see :mod:`ivl.vocab.dtw`), ``auto``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ivl._fs import default_modes
from ivl.train.artefact import tokenizer_fingerprint
from ivl.vocab.tokens import special_ids, special_pairs, token_bytes, tokenizer_kind

logger = logging.getLogger("ivl")

FORMAT = 1
TENSORS_FILE = "vocab_map.safetensors"
META_FILE = "vocab_map.json"
KINDS = ("auto", "exact", "dtw", "padded")


@dataclass
class VocabMap:
    """Base token -> (value column, weight). Pass it as ``vocab_map=`` to the ops or IVLModel.

    Attributes
    ----------
    index : int64 [V_base]
        Value column read by each base token; -1 = unmapped (gets ``fill``).
    weight : float32 [V_base]
        Scale of that value logit (1 for exact matches, in [0, 1] for dtw).
    meta : dict
        ``kind``, ``base`` / ``value`` (``fingerprint``, ``tokens``, ``columns``),
        ``same_tokenizer``, ``stats``.

    Examples
    --------
    >>> vmap = VocabMap.build(base_tok, value_tok, kind="exact")  # doctest: +SKIP
    >>> vmap.save("maps/smollm2-on-qwen"); VocabMap.load("maps/smollm2-on-qwen", base_tok, value_tok)  # doctest: +SKIP
    """

    index: torch.Tensor
    weight: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.index.dim() != 1 or self.index.dtype != torch.int64:
            raise ValueError(
                f"index must be int64 [V_base], got {self.index.dtype} {tuple(self.index.shape)}"
            )
        if self.weight.shape != self.index.shape:
            raise ValueError("weight must have the shape of index")
        self.weight = self.weight.to(torch.float32)

    # ---- facts ----------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return str(self.meta.get("kind", "?"))

    @property
    def same_tokenizer(self) -> bool:
        """True when base and value share a tokenizer (no re-tokenization bridge needed)."""
        return bool(self.meta.get("same_tokenizer", False))

    @property
    def base_size(self) -> int:
        return int(self.index.shape[0])

    def n_mapped(self) -> int:
        return int((self.index >= 0).sum())

    def nbytes(self) -> int:
        return self.index.nbytes + self.weight.nbytes

    def to(self, device) -> VocabMap:
        return VocabMap(self.index.to(device), self.weight.to(device), dict(self.meta))

    def __repr__(self) -> str:
        return (
            f"VocabMap(kind={self.kind!r}, base={self.base_size}, "
            f"mapped={self.n_mapped()}, same_tokenizer={self.same_tokenizer})"
        )

    # ---- checks ---------------------------------------------------------------------------
    def check(self, base_tok=None, value_tok=None, *, value_columns: int | None = None) -> None:
        """Raise ValueError if the map was built for other tokenizers or a smaller value head."""
        for side, tok in (("base", base_tok), ("value", value_tok)):
            want = (self.meta.get(side) or {}).get("fingerprint")
            if tok is None or want is None:
                continue
            got = tokenizer_fingerprint(tok)
            if got != want:
                raise ValueError(
                    f"this vocabulary map was built for another {side} tokenizer (fingerprint "
                    f"{want[:12]}, got {got[:12]} for {getattr(tok, 'name_or_path', '?')}): "
                    "rebuild it with `ivl vocab build` for these models"
                )
        top = int(self.index.max()) if self.index.numel() else -1
        if value_columns is not None and top >= value_columns:
            raise ValueError(
                f"the vocabulary map points at value column {top} but the value model has "
                f"{value_columns} output columns: rebuild it with `ivl vocab build`"
            )

    # ---- storage --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``path/vocab_map.safetensors`` + ``path/vocab_map.json`` atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            save_file(
                {"index": self.index.cpu().contiguous(), "weight": self.weight.cpu().contiguous()},
                tmp / TENSORS_FILE,
            )
            meta = {"format": FORMAT, **self.meta}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            default_modes(tmp)
            if path.exists():
                if not (path / META_FILE).is_file():
                    raise ValueError(
                        f"{path} exists and is not a vocabulary map: choose another path"
                    )
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], base_tok=None, value_tok=None, *, device=None
    ) -> VocabMap:
        """Read a saved map; with tokenizers given, check it was built for them."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / META_FILE).is_file() or not (path / TENSORS_FILE).is_file():
            raise ValueError(
                f"{path} is not a vocabulary map (needs {META_FILE} and {TENSORS_FILE}); "
                "build one with `ivl vocab build`"
            )
        meta = json.loads((path / META_FILE).read_text())
        if meta.pop("format", None) != FORMAT:
            raise ValueError(f"{path / META_FILE}: unsupported format (expected {FORMAT})")
        tensors = load_file(path / TENSORS_FILE, device=str(device or "cpu"))
        vmap = cls(tensors["index"], tensors["weight"], meta)
        vmap.check(base_tok, value_tok)
        return vmap

    # ---- building -------------------------------------------------------------------------
    @staticmethod
    def build(base_tok, value_tok, **options) -> VocabMap:
        """Build a map: :func:`build_map`, same arguments."""
        return build_map(base_tok, value_tok, **options)


def _side(tok, columns: int | None, fingerprint: str) -> dict[str, Any]:
    return {
        "fingerprint": fingerprint,
        "tokens": len(tok),
        "columns": int(columns if columns is not None else len(tok)),
        "name": str(getattr(tok, "name_or_path", "")),
    }


def same_tokenizer(a, b) -> bool:
    return a is b or tokenizer_fingerprint(a) == tokenizer_fingerprint(b)


def padded_map(
    base_columns: int, value_columns: int, tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Identity over the shared tokenizer; columns past either side's size are unmapped."""
    index = torch.arange(base_columns, dtype=torch.int64)
    index[min(value_columns, base_columns) :] = -1
    index[tokens:] = -1  # padding rows of the embedding matrix: never real tokens
    return index, torch.ones(base_columns, dtype=torch.float32)


def exact_map(base_tok, value_tok, base_columns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Base token -> the value token spelling the same bytes; specials by role."""
    bk, vk = tokenizer_kind(base_tok), tokenizer_kind(value_tok)
    b_special, v_special = special_ids(base_tok), special_ids(value_tok)
    by_bytes: dict[bytes, tuple[bool, int]] = {}
    for s, v in value_tok.get_vocab().items():
        if v in v_special:
            continue
        key = token_bytes(s, vk)
        if not key:
            continue
        # Prefer a normal token over a byte-fallback spelling (<0x41>), then the lower id.
        rank = (s.startswith("<0x"), v)
        if key not in by_bytes or rank < by_bytes[key]:
            by_bytes[key] = rank
    index = torch.full((base_columns,), -1, dtype=torch.int64)
    for s, b in base_tok.get_vocab().items():
        if b >= base_columns or b in b_special:
            continue
        key = token_bytes(s, bk)
        if key and key in by_bytes:
            index[b] = by_bytes[key][1]
    for b, v in special_pairs(base_tok, value_tok).items():
        if b < base_columns:
            index[b] = v
    return index, torch.ones(base_columns, dtype=torch.float32)


def build_map(
    base_tok,
    value_tok,
    *,
    kind: str = "auto",
    base_columns: int | None = None,
    value_columns: int | None = None,
    corpus: Iterable[str] | None = None,
    progress: bool = False,
) -> VocabMap:
    """Build a :class:`VocabMap` from the two tokenizers.

    Parameters
    ----------
    base_tok, value_tok : fast tokenizers
    kind : str
        ``padded``: same tokenizer, different padded vocab sizes (identity; padding columns
        unmapped). ``exact``: same bytes after undoing byte-level / SentencePiece spellings,
        special tokens by content or role, weight 1. ``dtw``: the authors' corpus alignment
        (needs ``corpus``). ``auto``: ``padded`` for the same tokenizer, else ``exact``, refined
        by ``dtw`` for the base tokens exact matching leaves unmapped when a corpus is given.
    base_columns, value_columns : int, optional
        Output columns of the models (their padded vocab sizes); default: tokenizer sizes.
    corpus : iterable of str, optional
        Texts for ``dtw`` (e.g. :func:`ivl.vocab.corpus.corpus_texts`).

    Examples
    --------
    >>> vmap = build_map(qwen_tok, smollm_tok, kind="exact")  # doctest: +SKIP
    """
    if kind not in KINDS:
        raise ValueError(f"unknown map kind {kind!r}; choose one of {', '.join(KINDS)}")
    base_columns = int(base_columns or len(base_tok))
    value_columns = int(value_columns or len(value_tok))
    t0 = time.perf_counter()
    base_fp, value_fp = tokenizer_fingerprint(base_tok), tokenizer_fingerprint(value_tok)
    same = base_fp == value_fp
    stats: dict[str, Any] = {}
    if kind == "padded" or (kind == "auto" and same):
        if not same:
            raise ValueError(
                "kind='padded' needs the same tokenizer on both sides; use kind='exact' or 'dtw'"
            )
        index, weight = padded_map(base_columns, value_columns, len(base_tok))
        kind = "padded" if base_columns != value_columns else "identity"
    elif kind == "exact" or (kind == "auto" and corpus is None):
        index, weight = exact_map(base_tok, value_tok, base_columns)
        kind = "exact"
    else:
        from ivl.vocab.dtw import dtw_map

        if corpus is None:
            raise ValueError("kind='dtw' needs a corpus (texts to align): pass corpus=")
        index, weight, stats = dtw_map(base_tok, value_tok, corpus, base_columns, progress=progress)
        if kind == "auto":
            e_index, e_weight = exact_map(base_tok, value_tok, base_columns)
            # Exact matches win (weight 1); dtw fills what exact matching leaves unmapped.
            use_exact = e_index >= 0
            index = torch.where(use_exact, e_index, index)
            weight = torch.where(use_exact, e_weight, weight)
            kind = "exact+dtw"
    index[index >= value_columns] = -1
    weight = torch.where(index >= 0, weight, torch.zeros_like(weight))
    stats["build_seconds"] = round(time.perf_counter() - t0, 3)
    stats["mapped"] = int((index >= 0).sum())
    stats["mapped_share"] = round(stats["mapped"] / max(1, min(base_columns, len(base_tok))), 4)
    meta = {
        "kind": kind,
        "same_tokenizer": same,
        "base": _side(base_tok, base_columns, base_fp),
        "value": _side(value_tok, value_columns, value_fp),
        "stats": stats,
    }
    logger.info(
        "vocabulary map %s: %d of %d base tokens mapped (%.1fs)",
        kind,
        stats["mapped"],
        base_columns,
        stats["build_seconds"],
    )
    return VocabMap(index, weight, meta)


def resolve(vocab_map, base_tok, value_tok, *, base_columns: int, value_columns: int) -> VocabMap:
    """A VocabMap from what users pass: a VocabMap, a saved folder, "auto" or an (index, weight) pair."""
    if isinstance(vocab_map, VocabMap):
        vmap = vocab_map
    elif isinstance(vocab_map, str) and vocab_map == "auto":
        vmap = build_map(
            base_tok, value_tok, kind="auto", base_columns=base_columns, value_columns=value_columns
        )
    elif isinstance(vocab_map, (str, os.PathLike)):
        vmap = VocabMap.load(vocab_map)
    elif isinstance(vocab_map, (tuple, list)) and len(vocab_map) == 2:
        index, weight = vocab_map
        vmap = VocabMap(
            torch.as_tensor(index, dtype=torch.int64).cpu(),
            torch.as_tensor(weight, dtype=torch.float32).cpu(),
            {"kind": "user", "same_tokenizer": same_tokenizer(base_tok, value_tok)},
        )
    else:
        raise TypeError(
            "vocab_map must be an ivl.VocabMap, the folder of a saved map, 'auto' or an "
            f"(index, weight) pair, got {type(vocab_map).__name__}"
        )
    vmap.check(base_tok, value_tok, value_columns=value_columns)
    if vmap.base_size != base_columns:
        raise ValueError(
            f"the vocabulary map covers {vmap.base_size} base tokens but the base model has "
            f"{base_columns} output columns: rebuild it with `ivl vocab build`"
        )
    return vmap
