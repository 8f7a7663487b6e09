"""Offline texts for building (dtw) and checking (coverage) vocabulary maps.

Sources: the training recipes' data (``gsm-symbolic``, ``sharegpt``; see ivl.train.recipes) or
a local file (``.txt``: paragraphs split at blank lines; ``.jsonl``: the string fields of each
record). Nothing is downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

SOURCES = ("gsm-symbolic", "sharegpt")


def _record_texts(rec) -> Iterator[str]:
    if isinstance(rec, str):
        yield rec
    elif isinstance(rec, dict):
        for v in rec.values():
            yield from _record_texts(v)
    elif isinstance(rec, list):
        for v in rec:
            yield from _record_texts(v)


def corpus_texts(source: str, *, max_chars: int = 1_000_000) -> list[str]:
    """Texts from ``source`` (a recipe name or a file), stopping after ``max_chars`` characters."""
    if source in SOURCES:
        from ivl.train import recipes

        if source == "gsm-symbolic":
            # ~600 characters per problem + worked solution
            records, _ = recipes.load(source, train_examples=max(1, max_chars // 500))
        else:
            records, _ = recipes.load(source)
        stream = (t for rec in records for t in _record_texts(rec))
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(
                f"corpus {source!r} is neither a built-in source ({', '.join(SOURCES)}) nor a file"
            )
        if path.suffix == ".jsonl":
            lines = path.read_text(encoding="utf-8").splitlines()
            stream = (t for line in lines if line.strip() for t in _record_texts(json.loads(line)))
        else:
            stream = iter(path.read_text(encoding="utf-8").split("\n\n"))
    out, total = [], 0
    for text in stream:
        if not text.strip():
            continue
        out.append(text)
        total += len(text)
        if total >= max_chars:
            break
    if not out:
        raise ValueError(f"corpus {source!r} holds no text")
    return out
