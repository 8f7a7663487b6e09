"""The authors' corpus-alignment map (METHOD.md section 4), computed sparsely.

1. Tokenize each corpus text with both tokenizers (with character offsets).
2. Align the two token sequences with dynamic time warping whose local cost is the edit distance
   of the two token strings after stripping the word-boundary marker (the leading space), times
   0.1 when one string contains the other.
3. Count aligned (base, value) pairs; centre each row of the count matrix by its mean over all
   value columns; min-max normalise each column; keep the best value token of each base token
   and its normalised score as weight in [0, 1].

What we do differently, and why:

- DTW runs between the *shared boundaries* of the two tokenizations (character offsets where
  both split the text, e.g. most word starts). The full quadratic DTW over a document almost
  always passes through them; cutting there makes the cost linear in the corpus (a few MB in
  seconds) instead of quadratic per document. Segments of one token on each side (most of them)
  are counted directly, and repeated segments reuse their cached alignment.
- The counts stay sparse. Centring and min-max use the dense matrix's values (an absent pair
  counts 0), but the best value token of a base token is chosen among the value tokens it was
  actually aligned with: the authors' dense argmax gives base tokens never seen in the corpus an
  arbitrary column with weight ~1; here they stay unmapped (``auto`` maps them exactly).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from functools import lru_cache

import numpy as np
import torch

from ivl.vocab.tokens import special_ids, token_bytes, tokenizer_kind

SUBSTRING_FACTOR = 0.1


@lru_cache(maxsize=1 << 18)
def _edit(a: str, b: str) -> float:
    """Levenshtein distance, x0.1 when one string contains the other."""
    if a == b:
        return 0.0
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    d = float(prev[-1])
    return d * SUBSTRING_FACTOR if (b in a) else d


def _strings(tok) -> list[str]:
    """Token strings with the word-boundary marker (leading spaces) stripped."""
    kind = tokenizer_kind(tok)
    out = [""] * len(tok)
    for s, i in tok.get_vocab().items():
        if i < len(out):
            raw = token_bytes(s, kind)
            out[i] = (raw.decode("utf-8", "replace") if raw is not None else s).lstrip(" ")
    return out


def dtw_path(a: list[str], b: list[str]) -> list[tuple[int, int]]:
    """The minimal-cost monotone alignment of two token-string sequences (pairs of positions)."""
    n, m = len(a), len(b)
    cost = np.array([[_edit(x, y) for y in b] for x in a], dtype=np.float64)
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            acc[i, j] = cost[i - 1, j - 1] + min(acc[i - 1, j], acc[i, j - 1], acc[i - 1, j - 1])
    path, i, j = [], n, m
    while i > 0 and j > 0:
        path.append((i - 1, j - 1))
        step = int(np.argmin((acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1])))
        if step == 0:
            i, j = i - 1, j - 1
        elif step == 1:
            i -= 1
        else:
            j -= 1
    return path[::-1]


def _cuts(offsets: list[tuple[int, int]], length: int) -> np.ndarray:
    """Character positions where this tokenization splits the text cleanly."""
    ends = np.array([e for _, e in offsets], dtype=np.int64)
    starts = np.array([s for s, _ in offsets], dtype=np.int64)
    ok = starts[1:] >= ends[:-1]  # byte-level pieces of one character share its offsets
    return np.unique(np.concatenate([ends[:-1][ok], [length]]))


def align_counts(base_tok, value_tok, corpus: Iterable[str], *, progress: bool = False):
    """Sparse counts of aligned (base id, value id) pairs over a corpus: (keys, counts, stats)."""
    from tqdm.auto import tqdm

    b_str, v_str = _strings(base_tok), _strings(value_tok)
    vv = len(value_tok)
    pairs_b: list[np.ndarray] = []
    pairs_v: list[np.ndarray] = []
    cache: dict[tuple, list[tuple[int, int]]] = {}
    n_chars = n_segments = n_dtw = 0
    texts = list(corpus)
    for text in tqdm(texts, desc="dtw align", unit="text", disable=not progress):
        if not text:
            continue
        eb = base_tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ev = value_tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ib, iv = (
            np.array(eb["input_ids"], dtype=np.int64),
            np.array(ev["input_ids"], dtype=np.int64),
        )
        if not len(ib) or not len(iv):
            continue
        n_chars += len(text)
        common = np.intersect1d(
            _cuts(eb["offset_mapping"], len(text)), _cuts(ev["offset_mapping"], len(text))
        )
        # Segment of each token: the first shared cut at or after its end.
        sb = np.searchsorted(common, [e for _, e in eb["offset_mapping"]], side="left")
        sv = np.searchsorted(common, [e for _, e in ev["offset_mapping"]], side="left")
        nb = np.bincount(sb, minlength=len(common))
        nv = np.bincount(sv, minlength=len(common))
        n_segments += len(common)
        one = (nb == 1) & (nv == 1)
        # 1 x 1 segments (the common case): the pair is the alignment.
        first_b = np.searchsorted(sb, np.arange(len(common)), side="left")
        first_v = np.searchsorted(sv, np.arange(len(common)), side="left")
        pairs_b.append(ib[first_b[one]])
        pairs_v.append(iv[first_v[one]])
        for seg in np.nonzero(~one & (nb > 0) & (nv > 0))[0]:
            bs = ib[first_b[seg] : first_b[seg] + nb[seg]]
            vs = iv[first_v[seg] : first_v[seg] + nv[seg]]
            key = (bs.tobytes(), vs.tobytes())
            path = cache.get(key)
            if path is None:
                n_dtw += 1
                path = dtw_path([b_str[i] for i in bs], [v_str[j] for j in vs])
                cache[key] = path
            pi = np.array(path, dtype=np.int64)
            pairs_b.append(bs[pi[:, 0]])
            pairs_v.append(vs[pi[:, 1]])
    if not pairs_b:
        raise ValueError("the corpus is empty: give texts to align for kind='dtw'")
    keys = np.concatenate(pairs_b) * vv + np.concatenate(pairs_v)
    keys, counts = np.unique(keys, return_counts=True)
    stats = {
        "corpus_chars": n_chars,
        "corpus_texts": len(texts),
        "segments": n_segments,
        "dtw_segments": n_dtw,
        "aligned_pairs": int(counts.sum()),
        "distinct_pairs": len(keys),
    }
    return keys, counts, stats


def dtw_map(
    base_tok, value_tok, corpus: Iterable[str], base_columns: int, *, progress: bool = False
):
    """(index int64 [base_columns], weight fp32 [base_columns], stats) from corpus alignment."""
    t0 = time.perf_counter()
    keys, counts, stats = align_counts(base_tok, value_tok, corpus, progress=progress)
    vv, vb = len(value_tok), len(base_tok)
    rows, cols = keys // vv, keys % vv
    counts = counts.astype(np.float64)
    row_mean = np.bincount(rows, weights=counts, minlength=vb) / vv  # dense row means
    centred = counts - row_mean[rows]
    # Column min / max over the dense centred matrix: absent entries hold -row_mean[b].
    ucols, col_of = np.unique(cols, return_inverse=True)
    cmax = np.full(len(ucols), -np.inf)
    cmin = np.full(len(ucols), np.inf)
    np.maximum.at(cmax, col_of, centred)
    np.minimum.at(cmin, col_of, centred)
    present: dict[int, set] = {}
    for r, c in zip(rows.tolist(), col_of.tolist(), strict=True):
        present.setdefault(c, set()).add(r)
    asc, desc = np.argsort(row_mean, kind="stable"), np.argsort(-row_mean, kind="stable")
    for c in range(len(ucols)):
        have = present[c]
        if len(have) < vb:  # some row lacks this column: its -row_mean is a dense entry
            lo = next(int(r) for r in asc if int(r) not in have)
            hi = next(int(r) for r in desc if int(r) not in have)
            cmax[c] = max(cmax[c], -row_mean[lo])
            cmin[c] = min(cmin[c], -row_mean[hi])
    span = (cmax - cmin)[col_of]
    norm = np.where(span > 0, (centred - cmin[col_of]) / np.where(span > 0, span, 1.0), 0.0)
    # Best value token per base token among those it was aligned with (ties: the lower id).
    order = np.lexsort((cols, -norm, rows))
    first = np.ones(len(order), dtype=bool)
    first[1:] = rows[order][1:] != rows[order][:-1]
    best = order[first]
    index = torch.full((base_columns,), -1, dtype=torch.int64)
    weight = torch.zeros(base_columns, dtype=torch.float32)
    keep = rows[best] < base_columns
    index[torch.from_numpy(rows[best][keep])] = torch.from_numpy(cols[best][keep])
    weight[torch.from_numpy(rows[best][keep])] = torch.from_numpy(
        norm[best][keep].astype(np.float32)
    )
    # Special tokens carry no text: never map them through text alignment.
    for b in special_ids(base_tok):
        if b < base_columns:
            index[b], weight[b] = -1, 0.0
    stats["dtw_seconds"] = round(time.perf_counter() - t0, 3)
    return index, weight, stats
