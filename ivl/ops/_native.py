"""The native kernels in ``ivl._C``: availability, fake (meta) impls and thin callables.

Importing ``ivl._C`` registers ``torch.ops.ivl.{merge_logits, philox_uniform, merged_log_softmax,
merge_sample}`` (C++ CPU kernels, plus CUDA kernels when the extension was built with nvcc) and
the CPU-only ``torch.ops.ivl.narrow_linear`` (``x @ weight.T + bias`` for the few rows of a decode
step; the engine routes its CPU forwards' linears through it, ``ivl.engine.concurrent``). Their
semantics are those of ``ivl.ops.reference``: bit for bit for ``merge_logits`` and the random
stream, token for token for ``merge_sample`` (up to the float-rounding cases documented in
``tests/test_merge_sample.py``), to fp32 rounding for log-probabilities. The schemas live in
``csrc/cpu/ops.cpp``. These callables do no argument normalisation: ``ivl.ops`` validates and
then calls them.

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
    log.info("native extension ivl._C loaded (CPU kernels; CUDA kernels: %s)", HAS_CUDA)
else:
    log.warning("native extension unavailable: %s; %s", REASON, _FIX)


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

    @torch.library.register_fake("ivl::merged_log_softmax")
    def _merged_log_softmax_fake(base, value, alpha, map_index, map_weight, fill, vocab_limit):
        torch._check(base.dim() == 2, lambda: f"base must be [B, V], got {tuple(base.shape)}")
        return base.new_empty((base.shape[0], base.shape[1]), dtype=torch.float32)

    @torch.library.register_fake("ivl::merge_sample")
    def _merge_sample_fake(
        base, value, alpha, map_index, map_weight, fill, vocab_limit, *params, want_logprobs=True
    ):
        torch._check(base.dim() == 2, lambda: f"base must be [B, V], got {tuple(base.shape)}")
        n = base.shape[0]
        return base.new_empty((n,), dtype=torch.int64), base.new_empty((n,), dtype=torch.float32)

    @torch.library.register_fake("ivl::narrow_linear")
    def _narrow_linear_fake(x, weight, bias):
        torch._check(x.dim() == 2, lambda: f"x must be [M, K], got {tuple(x.shape)}")
        return x.new_empty((x.shape[0], weight.shape[0]))


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


def merged_log_softmax(
    base: torch.Tensor,  # [B, Vb] fp32 / bf16 / fp16
    value: torch.Tensor | None,  # [B, Vv] fp32 / bf16 / fp16
    alpha: torch.Tensor,  # [B] fp32
    map_index: torch.Tensor | None,  # [Vb] int64, < 0 = unmapped
    map_weight: torch.Tensor | None,  # [Vb] fp32
    fill: float,
    vocab_limit: int,
) -> torch.Tensor:
    """log_softmax of the merged logits, fp32 [B, Vb]; all-NaN rows where the merged row is invalid.

    Examples
    --------
    >>> merged_log_softmax(torch.zeros(1, 2), None, torch.ones(1), None, None, 0.0, 2)
    tensor([[-0.6931, -0.6931]])
    """
    return torch.ops.ivl.merged_log_softmax(
        base, value, alpha, map_index, map_weight, float(fill), int(vocab_limit)
    )


def merge_sample(
    base: torch.Tensor,  # [B, Vb] fp32 / bf16 / fp16
    value: torch.Tensor | None,  # [B, Vv] fp32 / bf16 / fp16
    alpha: torch.Tensor,  # [B] fp32
    map_index: torch.Tensor | None,  # [Vb] int64, < 0 = unmapped
    map_weight: torch.Tensor | None,  # [Vb] fp32
    fill: float,
    vocab_limit: int,
    temperature: torch.Tensor,  # [B] fp32, 0 = greedy
    top_k: torch.Tensor,  # [B] int64, 0 = off
    top_p: torch.Tensor,  # [B] fp32, 1 = off
    min_p: torch.Tensor,  # [B] fp32, 0 = off
    seed: torch.Tensor,  # [B] int64
    step: torch.Tensor,  # [B] int64
    want_logprobs: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge, filter and sample one token per row: (tokens int64 [B], logprobs fp32 [B]).

    Tokens are -1 and logprobs NaN for invalid rows; logprobs are NaN everywhere when
    ``want_logprobs`` is False (the log-sum-exp work is skipped).

    Examples
    --------
    >>> t = torch.zeros(1)
    >>> i = torch.zeros(1, dtype=torch.int64)
    >>> merge_sample(torch.tensor([[0.0, 5.0, 1.0]]), None, torch.ones(1), None, None, 0.0, 3,
    ...              t, i, torch.ones(1), t, i, i)[0]
    tensor([1])
    """
    return torch.ops.ivl.merge_sample(
        base,
        value,
        alpha,
        map_index,
        map_weight,
        float(fill),
        int(vocab_limit),
        temperature,
        top_k,
        top_p,
        min_p,
        seed,
        step,
        bool(want_logprobs),
    )
