"""The merged training loss, computed in chunks over tokens (METHOD.md section 2).

For tokens t with a supervised next token y_t (``labels[t + 1] != -100``)::

    z_t   = z_base(t) + z_value(t)                      # [V], fp32
    CE    = sum_t ce(softmax(z_t), y_t) / n_ce            # n_ce: supervised tokens (default)
    R     = sum_{t in P} mean_v |z_value(t)[v]| / n_P     # penalty positions P
    loss  = CE + lam * R

``P`` is every position of the sequences, prompt included (``masked=False``, the default, as in
the authors' release), or only the supervised positions (``masked=True``). When an
``attention_mask`` is given, padding positions are left out of ``P``: the authors' code averages
over padding too, which makes the regulariser depend on how examples happen to be batched (and
breaks equivalence between gradient accumulation, data parallelism and one big batch). The base term is a
constant (the base is frozen); gradients flow into the value hidden states and LM head only.

Memory: the LM heads are applied here, chunk by chunk, to the final hidden states, and the
gradient of each chunk is computed right away in the forward pass (as in fused linear
cross-entropy kernels), so no ``[tokens, V]`` tensor outlives its chunk and nothing is recomputed
in backward. Per chunk the logits are fp32 (matmul in the hidden states' dtype, then upcast, like
an HF LM head under autocast). Positions that carry no weight (e.g. prompt tokens with
``masked=True``) are skipped entirely.

Denominators can be given explicitly (``ce_denominator``, ``penalty_denominator``): the trainer
passes the counts of the whole optimizer step (all micro-batches, all processes), so gradient
accumulation and data parallelism give the same update as one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ivl.train.data import IGNORE_INDEX

# Elements of one fp32 [chunk, V] tensor: 32M floats = 128 MiB (~220 tokens at V = 151,936).
# Every chunk reads both LM heads and reads + writes the V x D weight gradient, so fewer, larger
# chunks are faster (measured: two chunks for 128 tokens cost +25% over one on Qwen2.5-0.5B); a
# chunk's ~3 [chunk, V] temporaries stay below the fp32 weight gradient that is held anyway.
DEFAULT_CHUNK_ELEMENTS = 1 << 25


def even_chunk(rows: int, chunk: int) -> int:
    """The chunk length that splits ``rows`` into as few chunks of at most ``chunk`` rows as
    possible, all of about the same length (no short last chunk paying a full weight pass)."""
    if rows <= 0:
        return max(1, chunk)
    n = -(-rows // max(1, chunk))
    return -(-rows // n)


@dataclass
class LossParts:
    """Detached statistics of one loss call (sums, so callers can aggregate micro-batches)."""

    ce_sum: float  # sum of token cross-entropies
    n_ce: int  # supervised tokens
    penalty_sum: float  # sum over penalty positions of mean_v |z_value|
    n_penalty: int  # penalty positions


def shift_targets(labels: torch.Tensor) -> torch.Tensor:
    """``labels`` aligned with the input ids [B, L] -> next-token targets [B, L] (-100 at L-1)."""
    t = torch.full_like(labels, IGNORE_INDEX)
    t[:, :-1] = labels[:, 1:]
    return t


def _softcap(z: torch.Tensor, cap: float | None) -> torch.Tensor:
    return z if not cap else torch.tanh(z / cap) * cap


def _head(h, w, b, cap):
    z = (h @ w.to(h.dtype).t()).float()
    if b is not None:
        z = z + b.float()
    return _softcap(z, cap)


class _ChunkedMergedLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        h_base,  # [N, D_base]  (no grad)
        w_base,  # [V, D_base]  (no grad)
        h_value,  # [N, D_value]
        w_value,  # [V, D_value]
        b_value,  # [V] or None
        targets,  # [N] int64, -100 = no CE term
        ce_w,  # [N] fp32 per-row CE weight
        pen_w,  # [N] fp32 per-row penalty weight (already divided by V)
        b_base,
        caps,
        chunk,
    ):
        cap_b, cap_v = caps
        need_grad = any(ctx.needs_input_grad[i] for i in (2, 3, 4))
        rows = torch.nonzero((ce_w != 0) | (pen_w != 0)).flatten()
        chunk = even_chunk(rows.numel(), chunk)
        grad_h = torch.zeros_like(h_value) if need_grad else None
        dev = h_value.device
        # the V x D weight gradient is written by the first chunk's matmul (a zero-filled
        # buffer would cost one more pass over V x D: measured ~0.2 s at V = 151,936, D = 896)
        grad_w = grad_b = None
        has_b = need_grad and b_value is not None
        # fp64 scalar accumulators: sums over many chunks stay exact enough
        total = torch.zeros((), dtype=torch.float64, device=dev)
        ce_sum = torch.zeros((), dtype=torch.float64, device=dev)
        pen_sum = torch.zeros((), dtype=torch.float64, device=dev)
        with torch.no_grad(), torch.autocast(h_value.device.type, enabled=False):
            for s in range(0, rows.numel(), chunk):
                r = rows[s : s + chunk]
                hv = h_value[r]
                zv = _head(hv, w_value, b_value, cap_v)  # [C, V] fp32
                z = _head(h_base[r], w_base, b_base, cap_b)
                z += zv
                t = targets[r]
                has_t = t != IGNORE_INDEX
                t0 = torch.where(has_t, t, 0)
                z_t = z.gather(1, t0[:, None]).squeeze(1)
                # logsumexp by hand: exp(z - max) is kept and becomes softmax(z) for the gradient
                # (one exp pass and no [C, V] temporary besides z and zv)
                zmax = z.amax(dim=-1)
                z.sub_(zmax[:, None]).exp_()
                sumexp = z.sum(-1)
                lse = zmax + sumexp.log()
                ce = torch.where(has_t, lse - z_t, 0.0)
                # sum_v |zv| without an abs() temporary; times 1/V is folded into pen_w
                absmean = torch.linalg.vector_norm(zv, ord=1, dim=-1)
                cw, pw = ce_w[r], pen_w[r]
                total += (ce * cw).sum().double() + (absmean * pw).sum().double()
                ce_sum += ce.sum().double()
                pen_sum += (absmean * (pw != 0)).sum().double() / zv.shape[1]
                if not need_grad:
                    continue
                # d loss / d zv = cw * (softmax(z) - onehot(t)) + pw * sign(zv)
                g = z.mul_((cw / sumexp)[:, None])
                g.scatter_add_(1, t0[:, None], -(cw * has_t)[:, None])
                dcap = 1 - (zv / cap_v) ** 2 if cap_v else None
                g.add_(zv.sign_().mul_(pw[:, None]))  # zv is not needed any more
                if dcap is not None:
                    g.mul_(dcap)
                del zv, dcap
                gc = g.to(hv.dtype)
                grad_h[r] = (gc @ w_value.to(hv.dtype)).to(grad_h.dtype)
                if grad_w is None:
                    grad_w = (gc.t() @ hv).float()
                    grad_b = g.sum(0) if has_b else None
                else:
                    grad_w.addmm_(gc.t(), hv)
                    if has_b:
                        grad_b += g.sum(0)
        if need_grad and grad_w is None:  # no row carries a loss term
            grad_w = torch.zeros(w_value.shape, device=dev)
            grad_b = torch.zeros(w_value.shape[0], device=dev) if has_b else None
        ctx.w_dtype = w_value.dtype
        # Not save_for_backward: backward hands these buffers over and drops them (no copy).
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.mark_non_differentiable(ce_sum, pen_sum)
        return total.float(), ce_sum, pen_sum

    @staticmethod
    def backward(ctx, grad_total, _g1, _g2):
        if ctx.grads is None:
            raise RuntimeError(
                "merged_loss supports one backward pass per forward (its gradients are computed "
                "in the forward and handed over); compute the loss again instead of retain_graph"
            )
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None
        # The usual case (loss.backward() on this loss alone): hand the buffers over as they are;
        # scaling would allocate a second V x D weight gradient.
        one = bool(grad_total == 1)

        def scale(g, dtype):
            return (g if one else g * grad_total.to(g.dtype)).to(dtype)

        out = [None] * 11
        if grad_h is not None:
            out[2] = scale(grad_h, grad_h.dtype)
            out[3] = scale(grad_w, ctx.w_dtype)
        if grad_b is not None:
            out[4] = scale(grad_b, ctx.w_dtype)
        return tuple(out)


def _weights(targets, real, lam, masked, ce_denominator, penalty_denominator, vocab):
    has_t = targets != IGNORE_INDEX
    n_ce = int(has_t.sum())
    n_pen = n_ce if masked else int(real.sum())
    ce_den = float(ce_denominator if ce_denominator is not None else max(n_ce, 1))
    pen_den = float(penalty_denominator if penalty_denominator is not None else max(n_pen, 1))
    ce_w = has_t.float() / ce_den
    pen_mask = has_t.float() if masked else real.float()
    pen_w = pen_mask * (lam / (pen_den * vocab)) if lam else torch.zeros_like(ce_w)
    return ce_w, pen_w, n_ce, n_pen


def merged_loss(
    h_base: torch.Tensor,  # [B, L, D_base] final hidden states of the frozen base
    w_base: torch.Tensor,  # [V, D_base] base LM head
    h_value: torch.Tensor,  # [B, L, D_value] final hidden states of the value network
    w_value: torch.Tensor,  # [V, D_value] value LM head (trainable)
    labels: torch.Tensor,  # [B, L] aligned with input ids, -100 = not supervised
    *,
    lam: float = 1.0,
    masked: bool = False,
    attention_mask: torch.Tensor | None = None,  # [B, L] 1 = real token, 0 = padding
    b_base: torch.Tensor | None = None,
    b_value: torch.Tensor | None = None,
    softcap_base: float | None = None,
    softcap_value: float | None = None,
    ce_denominator: float | None = None,
    penalty_denominator: float | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, LossParts]:
    """Merged cross-entropy + ``lam`` * norm penalty, chunked over tokens; see module docstring.

    Returns the scalar loss (differentiable w.r.t. ``h_value``, ``w_value``, ``b_value``) and
    :class:`LossParts`.

    Examples
    --------
    >>> loss, parts = merged_loss(hb, model_b.lm_head.weight, hv, value.lm_head.weight, labels)
    ... # doctest: +SKIP
    >>> loss.backward()  # doctest: +SKIP
    """
    vocab = w_value.shape[0]
    if w_base.shape[0] != vocab:
        raise ValueError(
            f"base and value heads have different vocabulary sizes ({w_base.shape[0]} vs {vocab})"
        )
    targets = shift_targets(labels).reshape(-1)
    if attention_mask is None:
        real = torch.ones_like(targets, dtype=torch.bool)
    else:
        real = attention_mask.reshape(-1) != 0
    ce_w, pen_w, n_ce, n_pen = _weights(
        targets, real, lam, masked, ce_denominator, penalty_denominator, vocab
    )
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_ELEMENTS // vocab)
    hb = h_base.detach().reshape(-1, h_base.shape[-1])
    hv = h_value.reshape(-1, h_value.shape[-1])
    total, ce_sum, pen_sum = _ChunkedMergedLoss.apply(
        hb,
        w_base.detach(),
        hv,
        w_value,
        b_value,
        targets,
        ce_w,
        pen_w,
        None if b_base is None else b_base.detach(),
        (softcap_base, softcap_value),
        chunk_size,
    )
    return total, LossParts(float(ce_sum), n_ce, float(pen_sum), n_pen)


def naive_merged_loss(
    z_base: torch.Tensor,  # [B, L, V]
    z_value: torch.Tensor,  # [B, L, V]
    labels: torch.Tensor,  # [B, L]
    *,
    lam: float = 1.0,
    masked: bool = False,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same loss from full logit tensors (the readable spec; used by tests and benchmarks)."""
    targets = shift_targets(labels)
    z = z_base.detach().float() + z_value.float()
    ce = torch.nn.functional.cross_entropy(
        z.reshape(-1, z.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )
    per_pos = z_value.float().abs().mean(-1)  # [B, L]
    if masked:
        pen = per_pos[targets != IGNORE_INDEX].mean()
    else:
        pen = per_pos.mean() if attention_mask is None else per_pos[attention_mask != 0].mean()
    return ce + lam * pen
