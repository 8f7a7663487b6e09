"""merged_log_softmax on the native CPU backend against the reference and the float64 truth.

Tolerances: the kernel sums per-chunk fp32 exps in float64 and writes (z - max) - log(sum) in
fp32, so against log_softmax of the merged logits in float64 it is within
``TRUTH_TOL = 4e-6 * (1 + |truth|)`` (a few ulp of the output). Against the reference's own fp32
evaluation the bound is looser, ``REF_ATOL = 2e-4``: the reference's single fp32 sum over the row
is off by up to ~1e-4 on peaked 150k-vocab rows (tiny terms rounding against an accumulator near
1), and by 3e-5 on flat 262k rows. -inf entries, and all-NaN rows for invalid merged rows (NaN,
+inf, or nothing finite), must match exactly.
"""

from __future__ import annotations

import pytest
import torch

import ivl
from ivl.ops import _native
from ivl.ops import reference as R

if not _native.AVAILABLE:
    pytest.skip(
        f"native extension not built ({_native.REASON}); build it with "
        "`MAX_JOBS=2 python setup.py build_ext --inplace` or `make install`",
        allow_module_level=True,
    )

from ivl.ops import _native_merged_log_softmax as native_lsm

torch.set_num_threads(2)

INF, NAN = float("inf"), float("nan")
TRUTH_TOL = 4e-6
REF_ATOL = 2e-4
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def logits(b, v, dtype, gen, peaked=False):
    x = torch.randn(b, v, generator=gen) * 3
    if peaked:
        x[:, torch.randint(0, v, (3,), generator=gen)] += 15
    x[torch.rand(b, v, generator=gen) < 0.02] = -INF
    return x.to(dtype)


def check(base, value, **kw):
    got = native_lsm(base, value, **kw)
    want = R.merged_log_softmax(base, value, **kw)
    z = R.merge_logits(base, value, **kw).double()
    truth = torch.log_softmax(z, -1)
    assert got.dtype == torch.float32 and got.shape == want.shape and got.is_contiguous()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), "NaN positions differ"
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), "-inf positions differ"
    finite = torch.isfinite(want)
    diff = (got.double() - truth)[finite].abs()
    allowed = TRUTH_TOL * (1 + truth[finite].abs())
    assert (diff <= allowed).all(), f"max error vs float64 {diff.max().item():.3g}"
    assert (got - want)[finite].abs().max() <= REF_ATOL
    return got


@pytest.mark.parametrize("map_kind", ["none", "permutation", "partial"])
@pytest.mark.parametrize(
    ("b", "vb"), [(1, 1), (7, 111), (3, 1271), (5, 32000), (2, 151936), (1, 262144)]
)
def test_matches_reference(b, vb, map_kind):
    gen = torch.Generator().manual_seed(b * vb + len(map_kind))
    dtype = DTYPES[(b + vb) % 3]
    vv = vb if map_kind != "partial" else max(1, vb // 2 + 3)
    vmap = None
    if map_kind == "permutation":
        vmap = (torch.randperm(vb, generator=gen), torch.rand(vb, generator=gen))
    elif map_kind == "partial":
        index = torch.randint(-1, vv, (vb,), generator=gen)
        vmap = (index, torch.rand(vb, generator=gen))
    base = logits(b, vb, dtype, gen, peaked=vb % 2 == 0)
    value = logits(b, vv, torch.float32, gen)
    alpha = torch.rand(b, generator=gen)
    check(base, value, alpha=alpha, vocab_map=vmap, fill=-1.0, vocab_limit=max(1, vb - 3))
    check(base, None, vocab_limit=vb)


def test_invalid_rows_are_nan():
    gen = torch.Generator().manual_seed(1)
    base = logits(5, 300, torch.float32, gen)
    base[0, 3] = NAN
    base[1, 7] = INF
    base[2] = -INF
    base[3, 299] = INF  # masked by vocab_limit: fine
    out = check(base, None, vocab_limit=299)
    assert torch.isnan(out[:3]).all() and not torch.isnan(out[3:]).any()
    assert torch.isneginf(out[3, 299])


def test_strided_rows_and_threads():
    """Non-contiguous rows, and bitwise-identical output for 1 and 2 threads."""
    gen = torch.Generator().manual_seed(2)
    wide = logits(4, 70011, torch.bfloat16, gen)
    base = wide[:, 5:70005]
    value = logits(70000, 4, torch.float32, gen).t()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(check(base, value, alpha=0.5))
    finally:
        torch.set_num_threads(2)
    assert torch.equal(outs[0].view(torch.int32), outs[1].view(torch.int32))


def test_public_op_uses_the_native_kernel():
    base, value = torch.randn(3, 500), torch.randn(3, 500)
    got = ivl.merged_log_softmax(base, value, alpha=0.5)
    assert torch.equal(got, native_lsm(base, value, alpha=0.5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    gen = torch.Generator().manual_seed(3)
    b, vb, vv = 3, 37, 20
    base = logits(b, vb, dtype, gen)
    value = logits(b, vv, torch.float32, gen)
    index = torch.randint(-1, vv, (vb,), generator=gen)
    args = (base, value, torch.rand(b), index, torch.rand(vb), -0.5, vb - 2)
    torch.library.opcheck(torch.ops.ivl.merged_log_softmax.default, args)
    torch.library.opcheck(
        torch.ops.ivl.merged_log_softmax.default, (base, None, torch.ones(b), None, None, 0.0, vb)
    )
