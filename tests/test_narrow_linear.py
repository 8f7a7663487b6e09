"""``torch.ops.ivl.narrow_linear`` (csrc/include/ivl/linear_cpu.h): ``x @ weight.T + bias`` for
the few rows of a CPU decode step.

- Against the float64 product over shapes that hit every tile edge (M, N, K around the 4 x 3
  tile and the 8-wide K vectors), with and without bias, within fp32 rounding; bf16 / fp16
  models get the fp32 product of their widened values, rounded once.
- Each output row is bitwise the same whether computed alone or in any batch, and for 1 or 2
  threads (the kernel's documented invariance; BLAS does not promise it).
- Strided views give the contiguous result; empty shapes; clear errors; opcheck.
- The build without AVX2 / FMA (``IVL_CPU_SIMD=0``) falls back to BLAS with the same result.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ivl.ops import _native

if not _native.AVAILABLE:
    pytest.skip(
        f"native extension not built ({_native.REASON}); build it with "
        "`MAX_JOBS=2 python setup.py build_ext --inplace` or `make install`",
        allow_module_level=True,
    )

op = torch.ops.ivl.narrow_linear


def reference(x, w, b=None):
    y = x.double() @ w.double().T
    return y if b is None else y + b.double()


def assert_close_to(got, want, k, dtype=torch.float32):
    """fp32 rounding of a K-term dot product (errors grow ~ sqrt(K) eps |x||w|), then for 16-bit
    outputs one rounding to ``dtype``."""
    assert got.dtype == dtype and got.shape == want.shape
    err = (got.double() - want).abs()
    rounding = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    assert (err <= 4e-5 * max(k, 1) ** 0.5 + rounding * want.abs()).all(), err.max().item()


@pytest.mark.parametrize("m", [1, 3, 4, 5, 16, 17, 64])
@pytest.mark.parametrize("n,k", [(1, 1), (2, 7), (3, 8), (4, 9), (7, 24), (40, 100), (97, 131)])
def test_matches_float64_product(m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    x, w, b = (torch.randn(s, generator=g) for s in ((m, k), (n, k), (n,)))
    assert_close_to(op(x, w, None), reference(x, w), k)
    assert_close_to(op(x, w, b), reference(x, w, b), k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k", [(1, 5, 7), (4, 40, 100), (16, 97, 131), (64, 12, 896)])
def test_16_bit_models_get_fp32_products_rounded_once(dtype, m, n, k):
    g = torch.Generator().manual_seed(m + n + k)
    x, w, b = (torch.randn(s, generator=g).to(dtype) for s in ((m, k), (n, k), (n,)))
    assert_close_to(op(x, w, b), reference(x, w, b), k, dtype)
    assert_close_to(op(x, w, None), reference(x, w), k, dtype)
    # the widened fp32 problem, rounded once, bit for bit
    assert torch.equal(op(x, w, b), op(x.float(), w.float(), b.float()).to(dtype))
    assert torch.equal(op(x[1:], w, b), op(x, w, b)[1:])  # rows independent of the batch


def test_rows_do_not_depend_on_the_batch_or_threads():
    g = torch.Generator().manual_seed(0)
    x, w, b = (
        torch.randn(23, 301, generator=g),
        torch.randn(130, 301, generator=g),
        torch.randn(130),
    )
    full = op(x, w, b)
    for m in range(x.shape[0]):
        assert torch.equal(op(x[m : m + 1], w, b), full[m : m + 1])
    assert torch.equal(op(x[5:14], w, b), full[5:14])
    big = torch.randn(3000, 301, generator=g)  # big enough to be split between threads
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op(x, big, None)
        torch.set_num_threads(2)
        assert torch.equal(op(x, big, None), one)
    finally:
        torch.set_num_threads(before)


def test_strided_inputs_and_empty_shapes():
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(6, 40, generator=g), torch.randn(11, 40, generator=g), torch.randn(11)
    want = op(x, w, b)
    wide = torch.randn(6, 64, generator=g)
    wide[:, :40] = x
    assert torch.equal(op(wide[:, :40], w, b), want)  # row stride 64, used in place
    assert torch.equal(op(x.T.contiguous().T, w.T.contiguous().T, b), want)  # column-major
    assert torch.equal(op(x, w, torch.randn(22)[::2].copy_(b)), want)  # strided bias
    assert op(torch.randn(0, 40), w, b).shape == (0, 11)
    assert op(x, torch.randn(0, 40), None).shape == (6, 0)
    assert torch.equal(op(torch.randn(3, 0), torch.randn(11, 0), b), b.expand(3, 11))
    assert torch.equal(op(torch.randn(3, 0), torch.randn(11, 0), None), torch.zeros(3, 11))


def test_bad_inputs_say_what_is_wrong():
    x, w = torch.randn(2, 8), torch.randn(5, 8)
    with pytest.raises(RuntimeError, match=r"x must be \[M, K\]"):
        op(x[None], w, None)
    with pytest.raises(RuntimeError, match="one dtype among float32, bfloat16 and float16"):
        op(x, w.half(), None)
    with pytest.raises(RuntimeError, match="one dtype among"):
        op(x.double(), w.double(), None)
    with pytest.raises(RuntimeError, match="x has 8 features but weight expects 9"):
        op(x, torch.randn(5, 9), None)
    with pytest.raises(RuntimeError, match=r"bias must be Float \[5\]"):
        op(x, w, torch.randn(4))
    with pytest.raises(RuntimeError, match=r"bias must be BFloat16 \[5\], got Float"):
        op(x.bfloat16(), w.bfloat16(), torch.randn(5))


def test_opcheck():
    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(5, 19, generator=g), torch.randn(7, 19, generator=g), torch.randn(7)
    torch.library.opcheck(op.default, (x, w, b))
    torch.library.opcheck(op.default, (x, w, None))
    torch.library.opcheck(op.default, (x.bfloat16(), w.bfloat16(), b.bfloat16()))


def test_without_avx2_falls_back_to_blas():
    code = (
        "import torch, ivl.ops._native\n"
        "g = torch.Generator().manual_seed(3)\n"
        "x, w, b = torch.randn(5, 37, generator=g), torch.randn(9, 37, generator=g), torch.randn(9)\n"
        "y = torch.ops.ivl.narrow_linear(x, w, b)\n"
        "assert y.is_contiguous() and y.shape == (5, 9)\n"
        "print(torch.equal(y, torch.mm(w, x.T).T + b), torch.equal(y, torch.ops.ivl.narrow_linear(x[:1], w, b)[0]))\n"
    )
    run = lambda env: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True
    )
    out = run({"IVL_CPU_SIMD": "0"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "True"  # BLAS with the weight on the left, bit for bit
    simd = os.environ.get("IVL_CPU_SIMD") != "0"  # the suite itself may run without it
    if simd and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        out = run({})
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[0] == "False"  # the kernel's own summation order
