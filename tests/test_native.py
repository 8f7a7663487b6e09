"""The native ops (ivl._C: C++ CPU, CUDA when built) against the PyTorch reference.

- ``merge_logits`` and ``philox_uniform`` must equal ``ivl.ops.reference`` bit for bit (same bits
  incl. -0 and inf; NaN at the same positions) over shapes, dtypes, maps, vocab limits, alphas.
- ``torch.library.opcheck`` checks the schemas, fake impls and dispatcher registration.
- Bad inputs raise a RuntimeError that names the problem.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ivl.ops import _native
from ivl.ops import reference as R

if not _native.AVAILABLE:
    pytest.skip(
        f"native extension not built ({_native.REASON}); build it with "
        "`MAX_JOBS=2 python setup.py build_ext --inplace` or `make install`",
        allow_module_level=True,
    )

INF, NAN = float("inf"), float("nan")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_PAIRS = [(d, d) for d in DTYPES] + [
    (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.float16),
    (torch.float16, torch.float32),
]
SHAPES = [(b, v) for b in (1, 7, 33) for v in (1, 111, 1271, 49152)]
MAPS = ("none", "identity", "permutation", "partial", "partial_fill0")


def assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bitwise equality of fp32 tensors; NaNs only need to sit at the same positions."""
    assert got.dtype == want.dtype == torch.float32
    assert got.shape == want.shape
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), "NaN positions differ"
    g = got.view(torch.int32).masked_fill(nan, 0)
    w = want.view(torch.int32).masked_fill(nan, 0)
    if not torch.equal(g, w):
        bad = (g != w).nonzero()[:5].tolist()
        examples = [(r, c, got[r, c].item(), want[r, c].item()) for r, c in bad]
        pytest.fail(f"{int((g != w).sum())} elements differ, e.g. (row, col, got, want) {examples}")


def logits(
    b: int, v: int, dtype: torch.dtype, gen: torch.Generator, specials: bool
) -> torch.Tensor:
    """[b, v] logits with a few inf / -inf / NaN / -0 entries when ``specials``."""
    x = torch.randn(b, v, generator=gen) * 4
    if specials and x.numel() >= 8:
        idx = torch.randint(0, x.numel(), (max(4, x.numel() // 200),), generator=gen)
        vals = torch.tensor([INF, -INF, NAN, -0.0])
        x.view(-1)[idx] = vals[torch.arange(idx.numel()) % 4]
    return x.to(dtype)


def make_map(kind: str, vb: int, gen: torch.Generator):
    """(value columns, index [vb] | None, weight [vb] | None, fill) for a kind of vocab map."""
    if kind == "none":
        return vb, None, None, 0.0
    weight = torch.rand(vb, generator=gen)
    weight[torch.rand(vb, generator=gen) < 0.1] = 0.0  # zero weight skips the value term
    if kind == "identity":
        return vb, torch.arange(vb), torch.ones(vb), 0.0
    if kind == "permutation":
        return vb, torch.randperm(vb, generator=gen), weight, 0.0
    vv = max(1, (2 * vb) // 3 + 5)  # a different value vocabulary
    index = torch.randint(0, vv, (vb,), generator=gen)
    index[torch.rand(vb, generator=gen) < 0.3] = -1
    return vv, index, weight, (0.0 if kind == "partial_fill0" else -1.75)


def alpha_for(kind: str, b: int, gen: torch.Generator):
    """(alpha for the reference, fp32 [b] alpha for the op)."""
    if kind == "scalar":
        return 0.75, torch.tensor(0.75).expand(b)  # stride 0, like ivl.ops passes it
    if kind == "zero":
        return 0.0, torch.zeros(b)
    a = torch.randn(b, generator=gen)
    a[::3] = 0.0  # rows that must ignore inf / NaN value logits entirely
    return a, a


def native_vs_reference(base, value, alpha, index, weight, fill, vocab_limit):
    a_ref, a_op = alpha
    vmap = None if index is None else (index, weight)
    want = R.merge_logits(
        base, value, alpha=a_ref, vocab_map=vmap, fill=fill, vocab_limit=vocab_limit
    )
    got = _native.merge_logits(base, value, a_op, index, weight, fill, vocab_limit)
    assert got.is_contiguous()
    assert_same_bits(got, want)


# ---------------------------------------------------------------------------------------------
# merge_logits == reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", MAPS)
@pytest.mark.parametrize(("b", "vb"), SHAPES)
def test_merge_matches_reference(b, vb, kind):
    gen = torch.Generator().manual_seed(1000 * b + vb + MAPS.index(kind))
    vv, index, weight, fill = make_map(kind, vb, gen)
    limits = [vb] if vb == 1 else [vb, max(1, vb - 1 - vb // 10)]
    # Long rows take half the dtype pairs each (alternating over map kinds, so all are covered)
    # and one vocab_limit per pair, to keep the fast suite fast on 2 cores.
    long_row = vb > 10_000
    pairs = DTYPE_PAIRS[MAPS.index(kind) % 2 :: 2] if long_row else DTYPE_PAIRS
    for i, (db, dv) in enumerate(pairs):
        base = logits(b, vb, db, gen, specials=True)
        value = logits(b, vv, dv, gen, specials=True)
        alpha = alpha_for(("per_row", "scalar", "zero")[i % 3], b, gen)
        for vocab_limit in limits[i % 2 :: 2] if long_row else limits:
            native_vs_reference(base, value, alpha, index, weight, fill, vocab_limit)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("b", "vb"), [(1, 1271), (7, 111), (33, 1)])
def test_merge_without_value(b, vb, dtype):
    gen = torch.Generator().manual_seed(b + vb)
    base = logits(b, vb, dtype, gen, specials=True)
    alpha = alpha_for("per_row", b, gen)
    for vocab_limit in (vb, max(1, vb // 2)):
        native_vs_reference(base, None, alpha, None, None, 0.0, vocab_limit)


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_strided_rows(dtype):
    """Rows with any stride (slices of a wider buffer, transposes) give the same bits."""
    gen = torch.Generator().manual_seed(7)
    b, vb, vv = 5, 1271, 900
    wide = logits(b, vb + 13, dtype, gen, specials=True)
    base = wide[:, 5 : 5 + vb]  # row stride vb + 13, unit column stride
    value_t = logits(vv, b, dtype, gen, specials=True).t()  # column stride b: copied
    _, index, weight, fill = make_map("partial", vb, gen)
    index = index.clamp(max=vv - 1)
    alpha = alpha_for("per_row", b, gen)
    native_vs_reference(base, value_t, alpha, index, weight, fill, vb)
    one_row = wide[2:3, :vb]  # B = 1 view with an arbitrary row stride
    native_vs_reference(
        one_row, value_t[2:3], alpha_for("scalar", 1, gen), index, weight, fill, vb - 3
    )


def test_merge_any_negative_index_is_unmapped():
    gen = torch.Generator().manual_seed(3)
    base, value = logits(3, 50, torch.float32, gen, False), logits(3, 40, torch.float32, gen, False)
    index = torch.randint(-5, 40, (50,), generator=gen)
    weight = torch.rand(50, generator=gen)
    alpha = torch.tensor([1.0, 0.0, -2.0])
    got = _native.merge_logits(base, value, alpha, index, weight, 0.5, 50)
    want = R.merge_logits(
        base, value, alpha=alpha, vocab_map=(index.clamp(min=-1), weight), fill=0.5
    )
    assert_same_bits(got, want)


def test_merge_zero_rows_and_vocab_limit_zero():
    out = _native.merge_logits(
        torch.zeros(0, 9), torch.zeros(0, 9), torch.zeros(0), None, None, 0, 9
    )
    assert out.shape == (0, 9) and out.dtype == torch.float32
    out = _native.merge_logits(torch.zeros(2, 3), None, torch.ones(2), None, None, 0, 0)
    assert torch.equal(out, torch.full((2, 3), -INF))


def test_merge_no_fused_multiply_add():
    """(1 + 2^-12)^2 - 1: rounding the product first gives 2^-11, an FMA 2^-11 + 2^-24."""
    x = 1.0 + 2.0**-12
    out = _native.merge_logits(
        torch.full((1, 4), -1.0), torch.full((1, 4), x), torch.tensor([x]), None, None, 0.0, 4
    )
    assert out.tolist() == [[2.0**-11] * 4]


def test_merge_large_batch_threads():
    """Many rows and a long row split across threads give the same bits as the reference."""
    gen = torch.Generator().manual_seed(11)
    for b, vb in ((257, 3001), (2, 262147)):
        base = logits(b, vb, torch.bfloat16, gen, specials=True)
        value = logits(b, vb, torch.float32, gen, specials=True)
        native_vs_reference(base, value, alpha_for("per_row", b, gen), None, None, 0.0, vb - 2)


special = st.sampled_from([0.0, -0.0, 1.0, -1.5, 1e-30, 3e38, INF, -INF, NAN])
finite_or_special = st.one_of(st.floats(width=32, allow_nan=True), special)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    b=st.integers(1, 4),
    vb=st.integers(1, 12),
    vv=st.integers(1, 12),
    dtypes=st.sampled_from(DTYPE_PAIRS),
    fill=st.sampled_from([0.0, -0.0, 2.5, -1e30]),
)
def test_merge_property_small(data, b, vb, vv, dtypes, fill):
    """Arbitrary fp32 bit patterns (incl. specials) through a random partial map."""
    base = torch.tensor(data.draw(st.lists(finite_or_special, min_size=b * vb, max_size=b * vb)))
    value = torch.tensor(data.draw(st.lists(finite_or_special, min_size=b * vv, max_size=b * vv)))
    base, value = base.reshape(b, vb).to(dtypes[0]), value.reshape(b, vv).to(dtypes[1])
    index = torch.tensor(data.draw(st.lists(st.integers(-1, vv - 1), min_size=vb, max_size=vb)))
    weight = torch.tensor(
        data.draw(st.lists(st.sampled_from([0.0, 0.25, 1.0, 0.3]), min_size=vb, max_size=vb))
    )
    alpha = torch.tensor(
        data.draw(st.lists(st.sampled_from([0.0, 1.0, -0.5, 3.0]), min_size=b, max_size=b))
    )
    limit = data.draw(st.integers(1, vb))
    native_vs_reference(base, value, (alpha, alpha), index, weight, fill, limit)


# ---------------------------------------------------------------------------------------------
# philox_uniform == reference stream
# ---------------------------------------------------------------------------------------------
SEEDS = [0, 1, -1, -(2**63), 2**63 - 1, 0x243F6A8885A308D3, -123456789]
STEPS = [0, 1, 2**32, 2**32 + 5, 2**40 + 3, -1, 2**63 - 1]


@pytest.mark.parametrize("vocab", [1, 5, 111, 1271, 49152])
def test_philox_matches_reference(vocab):
    seed = torch.tensor(SEEDS, dtype=torch.int64)
    step = torch.tensor(STEPS, dtype=torch.int64)
    assert_same_bits(_native.philox_uniform(seed, step, vocab), R.philox_uniform(seed, step, vocab))


@pytest.mark.parametrize("b", [1, 7, 33])
def test_philox_rows_random_and_strided(b):
    gen = torch.Generator().manual_seed(b)
    seed = torch.randint(-(2**63), 2**63 - 1, (2 * b,), generator=gen)[::2]  # stride 2
    step = torch.randint(0, 2**62, (b,), generator=gen)
    got = _native.philox_uniform(seed, step, 1271)
    assert_same_bits(got, R.philox_uniform(seed, step, 1271))
    assert ((got > 0) & (got <= 1)).all()
    assert _native.philox_uniform(seed, step, 0).shape == (b, 0)


# ---------------------------------------------------------------------------------------------
# opcheck: schema, fake impl, dispatcher registration
# ---------------------------------------------------------------------------------------------
def opcheck_merge_cases():
    gen = torch.Generator().manual_seed(0)
    cases = []
    for (b, vb), (db, dv) in zip([(1, 7), (3, 33), (5, 129)], DTYPE_PAIRS[:3], strict=True):
        base, value = logits(b, vb, db, gen, False), logits(b, vb, dv, gen, False)
        cases.append((base, value, torch.rand(b), None, None, 0.0, vb))
        cases.append((base, None, torch.rand(b), None, None, 0.0, vb - 1))
    b, vb, vv = 3, 37, 20
    _, index, weight, fill = make_map("partial", vb, gen)
    index = index.clamp(max=vv - 1)
    wide = logits(b, vb + 4, torch.bfloat16, gen, False)[:, 2 : 2 + vb]  # strided rows
    value = logits(b, vv, torch.float16, gen, False)
    cases.append((wide, value, torch.tensor(0.5).expand(b), index, weight, fill, vb - 2))
    return cases


@pytest.mark.parametrize("args", opcheck_merge_cases())
def test_opcheck_merge_logits(args):
    torch.library.opcheck(torch.ops.ivl.merge_logits.default, args)


@pytest.mark.parametrize("vocab", [1, 6, 77])
def test_opcheck_philox_uniform(vocab):
    seed = torch.tensor([0, -1, 2**40], dtype=torch.int64)
    step = torch.tensor([3, 2**33, -7], dtype=torch.int64)
    torch.library.opcheck(torch.ops.ivl.philox_uniform.default, (seed, step, vocab))


def test_fake_impls_give_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = torch.ops.ivl.merge_logits(
            torch.empty(4, 10, dtype=torch.bfloat16), None, torch.empty(4), None, None, 0.0, 10
        )
        u = torch.ops.ivl.philox_uniform(
            torch.empty(4, dtype=torch.int64), torch.empty(4, dtype=torch.int64), 9
        )
    assert out.shape == (4, 10) and out.dtype == torch.float32
    assert u.shape == (4, 9) and u.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Errors name the problem
# ---------------------------------------------------------------------------------------------
def _merge(base=None, value=None, alpha=None, index=None, weight=None, fill=0.0, limit=None):
    base = torch.zeros(2, 8) if base is None else base
    alpha = torch.ones(base.shape[0]) if alpha is None else alpha
    limit = base.shape[-1] if limit is None else limit
    return _native.merge_logits(base, value, alpha, index, weight, fill, limit)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"value": torch.zeros(2, 5)}, r"value has 5 columns but base has 8 and no vocab map"),
        (
            {"value": torch.zeros(2, 5), "index": torch.full((8,), 5), "weight": torch.ones(8)},
            r"map_index contains value id 5 but value has only 5 columns",
        ),
        ({"base": torch.zeros(2, 3, 8), "alpha": torch.ones(2)}, r"base must be 2-D"),
        ({"value": torch.zeros(8)}, r"value must be 2-D"),
        ({"alpha": torch.ones(2, dtype=torch.float64)}, r"alpha must be float32"),
        ({"alpha": torch.ones(3)}, r"alpha must have shape \[2\]"),
        (
            {
                "value": torch.zeros(2, 5),
                "index": torch.zeros(8, dtype=torch.int32),
                "weight": torch.ones(8),
            },
            r"map_index must be int64",
        ),
        (
            {
                "value": torch.zeros(2, 5),
                "index": torch.zeros(8, dtype=torch.int64),
                "weight": torch.ones(8).double(),
            },
            r"map_weight must be float32",
        ),
        (
            {
                "value": torch.zeros(2, 5),
                "index": torch.zeros(7, dtype=torch.int64),
                "weight": torch.ones(7),
            },
            r"map_index must have shape \[8\]",
        ),
        ({"index": torch.zeros(8, dtype=torch.int64)}, r"must be given together"),
        (
            {"base": torch.zeros(2, 8, dtype=torch.float64)},
            r"base must be float32, bfloat16 or float16",
        ),
        (
            {"value": torch.zeros(2, 8, dtype=torch.int32)},
            r"value must be float32, bfloat16 or float16",
        ),
        ({"value": torch.zeros(3, 8)}, r"value has 3 rows but base has 2"),
        ({"limit": 9}, r"vocab_limit must be in \[0, 8\]"),
        ({"limit": -1}, r"vocab_limit must be in \[0, 8\]"),
    ],
)
def test_merge_errors(kwargs, match):
    with pytest.raises(RuntimeError, match=match):
        _merge(**kwargs)


def test_philox_errors():
    s = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="seed and step must be int64"):
        _native.philox_uniform(s.int(), s, 4)
    with pytest.raises(RuntimeError, match=r"must both have shape \[B\]"):
        _native.philox_uniform(s, s[:2], 4)
    with pytest.raises(RuntimeError, match="vocab must be >= 0"):
        _native.philox_uniform(s, s, -1)


# ---------------------------------------------------------------------------------------------
# CUDA kernels == CPU kernels (GPU suite)
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(not _native.HAS_CUDA, reason="ivl._C was built without CUDA kernels")
@pytest.mark.parametrize("kind", MAPS)
@pytest.mark.parametrize(("b", "vb"), [(1, 1), (7, 1271), (33, 49152), (3, 262147)])
def test_cuda_matches_cpu(b, vb, kind):
    gen = torch.Generator().manual_seed(b + vb)
    vv, index, weight, fill = make_map(kind, vb, gen)
    for db, dv in DTYPE_PAIRS:
        base = logits(b, vb, db, gen, specials=True)
        value = logits(b, vv, dv, gen, specials=True)
        _, alpha = alpha_for("per_row", b, gen)
        args = (base, value, alpha, index, weight, fill, max(1, vb - 3))
        want = _native.merge_logits(*args)
        cuda_args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
        assert_same_bits(_native.merge_logits(*cuda_args).cpu(), want)
    seed = torch.tensor(SEEDS, dtype=torch.int64)
    step = torch.tensor(STEPS, dtype=torch.int64)
    want = _native.philox_uniform(seed, step, vb)
    assert_same_bits(_native.philox_uniform(seed.cuda(), step.cuda(), vb).cpu(), want)
