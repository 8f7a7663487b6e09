"""Pure-PyTorch reference ops: the specification every kernel is tested against.

Readable rather than fast. Every backend (C++ CPU, CUDA, Triton) must reproduce these functions:
bit for bit for ``merge_logits`` and the random stream, token for token for ``merge_sample``
(up to documented float-rounding ties at filter boundaries).

The merge (METHOD.md sections 1 and 4), for row r and base token b, in fp32::

    out[r, b] = -inf                                   if b >= vocab_limit
              = base[r, b] + s * value[r, m(b)]         s = alpha[r] * w[b]   (mapped b)
              = base[r, b] + alpha[r] * fill             (unmapped b: index[b] == -1)

``s * value`` is rounded to fp32 before the add (no fused multiply-add), and a zero scale skips
the value term entirely, so ``alpha = 0`` returns the base logits exactly even where the value
row holds inf or NaN. Without a map, m(b) = b and w[b] = 1.

The random stream (DESIGN.md "Random numbers"): for a row with 64-bit ``seed`` and ``step``,
the draw for vocabulary index v is lane ``v & 3`` of Philox-4x32-10 with
key = (seed lo, seed hi) and counter = (v >> 2, 0, step lo, step hi), mapped to
w = fp32(x) * 2^-32 + 2^-33 in (0, 1]. Sampling is Gumbel-max over the kept tokens:

    token = argmax_v  z[v] / T + g[v],   g[v] = -log(-log1p(-min(w[v], 1 - 2^-24)))

which draws exactly from softmax(z / T) restricted to the kept set, needs one pass over the row,
and makes a request's tokens independent of its batch neighbours. Ties go to the lowest index.

Filters (applied to z / T, in this order; each keeps an upper set of values, ties kept):
  - top_k > 0: keep v with z[v] >= the k-th largest value;
  - top_p < 1: on the top-k set renormalised, keep v whose probability mass strictly above it is
    < top_p (the smallest high-probability set reaching top_p, plus ties at its boundary);
  - min_p > 0: keep v with p[v] >= min_p * p_max.
The most likely token always survives. Temperature 0 is greedy (argmax of z, filters ignored).

Chosen-token logprobs are log_softmax(z)[token] of the merged logits at temperature 1 with no
filtering: the model's own score of the token, independent of sampling settings.

Invalid rows: a merged row holding NaN or +inf (outside the masked tail), or with no finite
logit, has no distribution. It yields token ``INVALID_TOKEN`` (-1) and logprob NaN, never an
arbitrary id; callers must check (the engine fails that request alone).
"""

from __future__ import annotations

from typing import Any

import torch

from ._params import alpha_rows, check_merge_inputs, sampling_rows

INVALID_TOKEN = -1

_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_ONE_BELOW_1 = 1.0 - 2.0**-24  # largest fp32 below 1: keeps every Gumbel draw finite


# ---------------------------------------------------------------------------------------------
# Counter-based random numbers
# ---------------------------------------------------------------------------------------------
def _mulhilo32(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * m for uint32 values held in int64 (no int64 overflow)."""
    p_lo = a * (m & 0xFFFF)  # < 2^48
    p_hi = a * (m >> 16)  # < 2^48; a * m = p_hi * 2^16 + p_lo
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return hi, lo


def philox4x32_10(
    counter: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    key: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox-4x32-10 (Salmon et al., SC'11) on uint32 words stored in broadcastable int64."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for rnd in range(10):
        if rnd:
            k0 = (k0 + _PHILOX_W0) & _MASK32
            k1 = (k1 + _PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(c0, _PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, _PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox_uniform(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """The shared random stream: w in (0, 1] for every (row, vocab index).

    Parameters
    ----------
    seed, step : int64 [B]
        Per-row 64-bit key and counter (bit patterns; negative values are fine).
    vocab : int
        Number of draws per row.

    Returns
    -------
    float32 [B, vocab]
    """
    seed = seed.to(torch.int64).reshape(-1, 1)  # [B, 1]
    step = step.to(torch.int64).reshape(-1, 1)
    key = (seed & _MASK32, (seed >> 32) & _MASK32)
    blocks = torch.arange((vocab + 3) // 4, dtype=torch.int64, device=seed.device)[None, :]
    zero = torch.zeros_like(blocks)
    counter = (blocks, zero, step & _MASK32, (step >> 32) & _MASK32)
    lanes = torch.stack(torch.broadcast_tensors(*philox4x32_10(counter, key)), dim=-1)
    x = lanes.reshape(seed.shape[0], -1)[:, :vocab]  # [B, vocab], lane v & 3 of block v >> 2
    return x.to(torch.float32) * 2.0**-32 + 2.0**-33


def gumbel_noise(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """Standard Gumbel noise from the shared stream, fp32 [B, vocab], always finite."""
    w = philox_uniform(seed, step, vocab).clamp(max=_ONE_BELOW_1)
    return -torch.log(-torch.log1p(-w))


# ---------------------------------------------------------------------------------------------
# Merge
# ---------------------------------------------------------------------------------------------
def merge_logits(
    base: torch.Tensor,  # [B, V_base]
    value: torch.Tensor | None = None,  # [B, V_value]
    *,
    alpha: float | torch.Tensor = 1.0,
    vocab_map: Any = None,
    fill: float = 0.0,
    vocab_limit: int | None = None,
) -> torch.Tensor:
    """Merged logits z_base + alpha * w * z_value[map], fp32 [B, V_base].

    Parameters
    ----------
    base : [B, V_base] float32 / bfloat16 / float16
    value : [B, V_value] or None
        Value-network logits; None (or alpha = 0) returns the base logits.
    alpha : float or fp32 [B]
        Value strength per row.
    vocab_map : (index int64 [V_base], weight float [V_base]) or ivl.VocabMap, optional
        index[b] is the value token feeding base token b (-1 = unmapped); required when the
        vocabularies differ.
    fill : float
        Value logit assumed for unmapped base tokens (added as alpha * fill).
    vocab_limit : int, optional
        Base ids >= vocab_limit (padding past the tokenizer) are set to -inf.

    Examples
    --------
    >>> base, value = torch.zeros(1, 3), torch.tensor([[1.0, 2.0, 3.0]])
    >>> merge_logits(base, value, alpha=0.5, vocab_limit=2)
    tensor([[0.5000, 1.0000,   -inf]])
    """
    vmap, vocab_limit = check_merge_inputs(base, value, vocab_map, vocab_limit)
    n = base.shape[0]
    a = alpha_rows(alpha, n, base.device)[:, None]  # [B, 1]
    out = base.to(torch.float32)
    if value is not None:
        val = value.to(torch.float32)
        if vmap is None:
            scale = a.expand_as(out)
        else:
            index, weight = vmap
            mapped = index >= 0
            val = val.index_select(1, index.clamp(min=0))  # [B, V_base]
            scale = torch.where(mapped, a * weight[None, :], torch.zeros_like(a))
            term = a * torch.tensor(fill, dtype=torch.float32, device=base.device)  # [B, 1]
            out = torch.where(~mapped & (term != 0), out + term, out)
        out = torch.where(scale != 0, out + scale * val, out)
    if vocab_limit < out.shape[1]:
        out = out.clone()
        out[:, vocab_limit:] = float("-inf")
    return out


def merged_log_softmax(
    base: torch.Tensor,  # [B, V_base]
    value: torch.Tensor | None = None,  # [B, V_value]
    **merge_kwargs: Any,
) -> torch.Tensor:
    """log softmax of the merged logits, fp32 [B, V_base] (scoring / teacher forcing).

    Takes the keyword arguments of ``merge_logits``.
    """
    return torch.log_softmax(merge_logits(base, value, **merge_kwargs), dim=-1)


# ---------------------------------------------------------------------------------------------
# Filters and sampling
# ---------------------------------------------------------------------------------------------
def keep_mask(
    scaled: torch.Tensor,  # [B, V] fp32 logits / temperature, valid rows
    top_k: torch.Tensor,  # [B] int64, 0 = off
    top_p: torch.Tensor,  # [B] fp32 in (0, 1], 1 = off
    min_p: torch.Tensor,  # [B] fp32 in [0, 1], 0 = off
) -> torch.Tensor:
    """Boolean [B, V]: tokens that survive top-k, then top-p, then min-p (ties kept)."""
    _, v = scaled.shape
    keep = torch.ones_like(scaled, dtype=torch.bool)
    desc = scaled.sort(dim=-1, descending=True).values  # [B, V]

    k = top_k.clamp(max=v)
    use_k = (k > 0) & (k < v)
    kth = desc.gather(1, (k - 1).clamp(min=0)[:, None])  # [B, 1]
    keep &= ~use_k[:, None] | (scaled >= kth)

    # Probability mass in float64 so the spec itself adds no rounding noise at the boundary.
    kept_desc = torch.where(use_k[:, None] & (desc < kth), -torch.inf, desc)  # top-k set, sorted
    probs = torch.softmax(kept_desc.double(), dim=-1)
    mass_above = probs.cumsum(dim=-1) - probs  # exclusive: mass of strictly earlier positions
    use_p = top_p < 1
    inside = mass_above < top_p.double()[:, None]  # a prefix of the sorted row
    n_inside = inside.sum(dim=-1).clamp(min=1)
    tau_p = desc.gather(1, (n_inside - 1)[:, None])  # value of the last token inside
    keep &= ~use_p[:, None] | (scaled >= tau_p)

    use_m = min_p > 0
    rel = torch.exp(scaled.double() - desc[:, :1].double())  # p[v] / p_max
    keep &= ~use_m[:, None] | (rel >= min_p.double()[:, None])
    return keep


def invalid_rows(z: torch.Tensor) -> torch.Tensor:
    """Bool [B]: rows with NaN or +inf, or with no finite logit."""
    return torch.isnan(z).any(-1) | torch.isposinf(z).any(-1) | ~torch.isfinite(z).any(-1)


def merge_sample(
    base: torch.Tensor,  # [B, V_base]
    value: torch.Tensor | None = None,  # [B, V_value]
    *,
    alpha: float | torch.Tensor = 1.0,
    vocab_map: Any = None,
    fill: float = 0.0,
    vocab_limit: int | None = None,
    temperature: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
    min_p: float | torch.Tensor = 0.0,
    seed: int | torch.Tensor = 0,
    step: int | torch.Tensor = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge base and value logits and sample one token per row.

    Parameters are those of ``merge_logits`` plus per-row (scalar or [B]) sampling settings:
    temperature (0 = greedy), top_k (0 = off), top_p (1 = off), min_p (0 = off), and the
    64-bit ``seed`` and ``step`` that select the row's random numbers.

    Returns
    -------
    tokens : int64 [B]
        Sampled ids in [0, vocab_limit); ``INVALID_TOKEN`` (-1) for rows with no distribution.
    logprobs : float32 [B]
        log_softmax(merged logits)[token] at temperature 1, unfiltered; NaN for invalid rows.

    Examples
    --------
    >>> base = torch.tensor([[0.0, 5.0, 1.0]])
    >>> merge_sample(base, temperature=0.0)[0]
    tensor([1])
    """
    z = merge_logits(
        base, value, alpha=alpha, vocab_map=vocab_map, fill=fill, vocab_limit=vocab_limit
    )
    n, v = z.shape
    p = sampling_rows(
        n,
        z.device,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        seed=seed,
        step=step,
    )
    bad = invalid_rows(z)
    z = torch.where(bad[:, None], torch.zeros_like(z), z)  # keep the math below NaN-free

    greedy = p["temperature"] == 0
    tokens = z.argmax(dim=-1)
    if not greedy.all():  # (shortcut only: greedy rows ignore noise and filters)
        temp = torch.where(greedy, torch.ones_like(p["temperature"]), p["temperature"])
        scaled = z / temp[:, None]
        noisy = scaled + gumbel_noise(p["seed"], p["step"], v)
        filtered = (p["top_k"] > 0) | (p["top_p"] < 1) | (p["min_p"] > 0)
        if filtered.any():  # (shortcut only: keep_mask keeps everything when no filter is on)
            noisy = torch.where(
                keep_mask(scaled, p["top_k"], p["top_p"], p["min_p"]), noisy, -torch.inf
            )
        tokens = torch.where(greedy, tokens, noisy.argmax(dim=-1))

    logprobs = torch.log_softmax(z, dim=-1).gather(1, tokens[:, None])[:, 0]
    tokens = torch.where(bad, INVALID_TOKEN, tokens)
    logprobs = torch.where(bad, torch.nan, logprobs)
    return tokens, logprobs
