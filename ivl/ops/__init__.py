"""Public ops: merge base and value logits, score, and sample.

Each op validates its inputs once here, then runs on the backend chosen by ``ivl.ops.backend``
(native kernels when built, the pure-PyTorch reference otherwise). The reference in
``ivl.ops.reference`` is the specification; see its module docstring for the exact formulas,
the random-number contract and the behaviour on NaN / -inf rows.
"""

from __future__ import annotations

from typing import Any

import torch

from . import backend, reference
from ._params import alpha_rows, check_merge_inputs, sampling_rows
from .reference import INVALID_TOKEN

__all__ = ["INVALID_TOKEN", "merge_logits", "merge_sample", "merged_log_softmax"]


def _native_merge_args(base, value, alpha, vocab_map, fill, vocab_limit) -> tuple:
    """Validated positional merge arguments of the native ops (shared by all three)."""
    vmap, vocab_limit = check_merge_inputs(base, value, vocab_map, vocab_limit)
    index, weight = vmap if vmap is not None else (None, None)
    a = alpha_rows(alpha, base.shape[0], base.device)
    return base, value, a, index, weight, float(fill), vocab_limit


def _native_merge_logits(
    base: torch.Tensor,
    value: torch.Tensor | None,
    *,
    alpha: float | torch.Tensor = 1.0,
    vocab_map: Any = None,
    fill: float = 0.0,
    vocab_limit: int | None = None,
) -> torch.Tensor:
    from . import _native

    return _native.merge_logits(
        *_native_merge_args(base, value, alpha, vocab_map, fill, vocab_limit)
    )


def _native_merged_log_softmax(
    base: torch.Tensor,
    value: torch.Tensor | None,
    *,
    alpha: float | torch.Tensor = 1.0,
    vocab_map: Any = None,
    fill: float = 0.0,
    vocab_limit: int | None = None,
) -> torch.Tensor:
    from . import _native

    args = _native_merge_args(base, value, alpha, vocab_map, fill, vocab_limit)
    return _native.merged_log_softmax(*args)


def _native_merge_sample(
    base: torch.Tensor,
    value: torch.Tensor | None,
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
    from . import _native

    merge_args = _native_merge_args(base, value, alpha, vocab_map, fill, vocab_limit)
    p = sampling_rows(
        base.shape[0],
        base.device,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        seed=seed,
        step=step,
    )
    return _native.merge_sample(
        *merge_args,
        p["temperature"],
        p["top_k"],
        p["top_p"],
        p["min_p"],
        p["seed"],
        p["step"],
    )


for _name in ("merge_logits", "merge_sample", "merged_log_softmax"):
    backend.register(_name, "torch", getattr(reference, _name))
backend.register("merge_logits", "cpu", _native_merge_logits)
backend.register("merge_logits", "cuda", _native_merge_logits)
backend.register("merged_log_softmax", "cpu", _native_merged_log_softmax)
backend.register("merged_log_softmax", "cuda", _native_merged_log_softmax)
backend.register("merge_sample", "cpu", _native_merge_sample)
backend.register("merge_sample", "cuda", _native_merge_sample)


def _triton(name: str):
    """Triton implementation of ``name``, imported on first use (importing triton is slow)."""

    def call(*args: Any, **kwargs: Any):
        from . import triton as _t

        return getattr(_t, name)(*args, **kwargs)

    return call


for _name in ("merge_logits", "merge_sample", "merged_log_softmax"):
    backend.register(_name, "triton", _triton(_name))


def merge_logits(
    base: torch.Tensor,  # [B, V_base]
    value: torch.Tensor | None = None,  # [B, V_value]
    *,
    alpha: float | torch.Tensor = 1.0,
    vocab_map: Any = None,
    fill: float = 0.0,
    vocab_limit: int | None = None,
) -> torch.Tensor:
    """Merged logits z_base + alpha * w * z_value[map] in fp32, [B, V_base].

    See ``ivl.ops.reference.merge_logits`` for the parameters and exact semantics.

    Examples
    --------
    >>> import torch, ivl
    >>> ivl.merge_logits(torch.zeros(1, 3), torch.tensor([[1.0, 2.0, 3.0]]), alpha=0.5)
    tensor([[0.5000, 1.0000, 1.5000]])
    """
    impl = backend.implementation("merge_logits", base.device)
    return impl(base, value, alpha=alpha, vocab_map=vocab_map, fill=fill, vocab_limit=vocab_limit)


def merged_log_softmax(
    base: torch.Tensor,  # [B, V_base]
    value: torch.Tensor | None = None,  # [B, V_value]
    **merge_kwargs: Any,
) -> torch.Tensor:
    """log softmax of the merged logits, fp32 [B, V_base]; takes ``merge_logits``'s keywords.

    Rows whose merged logits hold NaN or +inf, or no finite value, come out all NaN.

    Examples
    --------
    >>> import torch, ivl
    >>> ivl.merged_log_softmax(torch.zeros(1, 2), torch.tensor([[0.0, 1.0]]), alpha=0.0)
    tensor([[-0.6931, -0.6931]])
    """
    impl = backend.implementation("merged_log_softmax", base.device)
    return impl(base, value, **merge_kwargs)


def merge_sample(
    base: torch.Tensor,  # [B, V_base]
    value: torch.Tensor | None = None,  # [B, V_value]
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge, filter (temperature, top-k, top-p, min-p) and sample one token per row.

    Returns (tokens int64 [B], logprobs fp32 [B]). See ``ivl.ops.reference.merge_sample`` for
    the parameters, the random-number contract and invalid-row behaviour.

    Examples
    --------
    >>> import torch, ivl
    >>> tokens, logprobs = ivl.merge_sample(torch.tensor([[0.0, 5.0, 1.0]]), temperature=0.0)
    >>> tokens
    tensor([1])
    """
    return backend.implementation("merge_sample", base.device)(base, value, **kwargs)
