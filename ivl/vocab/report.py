"""Coverage of a vocabulary map on a corpus, for ``ivl vocab check``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from ivl.vocab.map import VocabMap


def coverage(
    vmap: VocabMap, base_tok, texts: Iterable[str], *, examples: int = 20
) -> dict[str, Any]:
    """Share of base tokens mapped: over the vocabulary and weighted by corpus frequency.

    Returns ``{"vocab_share", "corpus_share", "corpus_tokens", "unmapped_examples"}`` where the
    examples are the most frequent unmapped base tokens in the corpus, as (token, count).
    """
    freq: Counter[int] = Counter()
    for text in texts:
        freq.update(base_tok(text, add_special_tokens=False)["input_ids"])
    index = vmap.index.tolist()
    total = sum(freq.values())
    mapped = sum(c for t, c in freq.items() if t < len(index) and index[t] >= 0)
    unmapped = [(t, c) for t, c in freq.most_common() if t >= len(index) or index[t] < 0]
    real = min(len(index), len(base_tok))
    return {
        "vocab_share": sum(1 for i in index[:real] if i >= 0) / max(1, real),
        "corpus_share": mapped / max(1, total),
        "corpus_tokens": total,
        "unmapped_examples": [
            (base_tok.convert_ids_to_tokens(t), c) for t, c in unmapped[:examples]
        ],
    }


def split_sample(tok, text: str) -> list[str]:
    """How a tokenizer splits ``text``: one decoded string per token."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return [tok.decode([i], clean_up_tokenization_spaces=False) for i in ids]
