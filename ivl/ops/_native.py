"""The native kernels in ``ivl._C``: availability, fake (meta) impls and thin callables.

Importing ``ivl._C`` registers ``torch.ops.ivl.merge_logits`` and ``torch.ops.ivl.philox_uniform``
(C++ CPU kernels, plus CUDA kernels when the extension was built with nvcc). Their semantics are
those of ``ivl.ops.reference`` bit for bit; the schemas live in ``csrc/cpu/ops.cpp``. These
callables do no argument normalisation: ``ivl.ops`` validates and then calls them.

Attributes
----------
AVAILABLE : bool
    Whether the extension loaded.
REASON : str
    Why it did not (empty when it did).
HAS_CUDA : bool
    Whether CUDA kernels were compiled in.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("ivl")

_FIX = (
    "rebuild it with `make install` (or `MAX_JOBS=2 python setup.py build_ext --inplace`) "
    "with the torch you run installed; until then ivl uses its pure-PyTorch reference ops"
)

try:
    from ivl import _C  # noqa: F401  (imported for its op registrations)
except ModuleNotFoundError as exc:
    AVAILABLE, REASON = False, f"ivl._C is not built ({exc})"
except (ImportError, OSError) as exc:  # e.g. undefined symbols: built against another torch
    AVAILABLE, REASON = False, f"ivl._C failed to load ({exc})"
else:
    AVAILABLE, REASON = True, ""

HAS_CUDA = AVAILABLE and torch._C._dispatch_has_kernel_for_dispatch_key("ivl::merge_logits", "CUDA")

if AVAILABLE:
    log.info("ivl: native extension ivl._C loaded (CPU kernels; CUDA kernels: %s)", HAS_CUDA)
else:
    log.warning("ivl: native extension unavailable: %s; %s", REASON, _FIX)


if AVAILABLE:
    # Fake impls: shapes for torch.compile / FakeTensor tracing. Both outputs are fresh
    # contiguous fp32 tensors whose shape depends only on the input shapes.
    @torch.library.register_fake("ivl::merge_logits")
    def _merge_logits_fake(base, value, alpha, map_index, map_weight, fill, vocab_limit):
        torch._check(base.dim() == 2, lambda: f"base must be [B, V], got {tuple(base.shape)}")
        return base.new_empty((base.shape[0], base.shape[1]), dtype=torch.float32)

    @torch.library.register_fake("ivl::philox_uniform")
    def _philox_uniform_fake(seed, step, vocab):
        torch._check(seed.dim() == 1, lambda: f"seed must be [B], got {tuple(seed.shape)}")
        return seed.new_empty((seed.shape[0], vocab), dtype=torch.float32)


def merge_logits(
    base: torch.Tensor,  # [B, Vb] fp32 / bf16 / fp16
    value: torch.Tensor | None,  # [B, Vv] fp32 / bf16 / fp16
    alpha: torch.Tensor,  # [B] fp32
    map_index: torch.Tensor | None,  # [Vb] int64, < 0 = unmapped
    map_weight: torch.Tensor | None,  # [Vb] fp32
    fill: float,
    vocab_limit: int,
) -> torch.Tensor:
    """Merged logits, fp32 [B, Vb]; ``ivl.ops.reference.merge_logits`` is the spec.

    Examples
    --------
    >>> base, value = torch.zeros(1, 3), torch.tensor([[1.0, 2.0, 3.0]])
    >>> merge_logits(base, value, torch.tensor([0.5]), None, None, 0.0, 2)
    tensor([[0.5000, 1.0000,   -inf]])
    """
    return torch.ops.ivl.merge_logits(
        base, value, alpha, map_index, map_weight, float(fill), int(vocab_limit)
    )


def philox_uniform(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """The shared random stream, fp32 [B, vocab] in (0, 1]; ``seed``, ``step``: int64 [B].

    Examples
    --------
    >>> philox_uniform(torch.tensor([0]), torch.tensor([0]), 2)
    tensor([[0.3990, 0.8805]])
    """
    return torch.ops.ivl.philox_uniform(seed, step, int(vocab))
