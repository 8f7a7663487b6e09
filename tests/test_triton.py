"""Triton kernels (ivl/ops/triton.py) against the reference ops (ivl/ops/reference.py).

Without a CUDA device the kernels run in Triton's NumPy interpreter on CPU tensors. Triton picks
interpreted vs compiled when a kernel is *decorated*, i.e. when ``ivl.ops.triton`` is first
imported, so ``TRITON_INTERPRET=1`` must be in the environment before that import anywhere in the
process: this module sets it (setdefault) before importing, and tests/conftest.py should do the
same so that collection order cannot matter. The interpreter is slow (~10 ms per row for plain
sampling, ~50-200 ms per filtered row), so shapes here are small; the big shapes of issue 3 run
in ``test_gpu_big_shapes`` when a GPU is present.

Tolerances: merged logits and sampled tokens are compared exactly; logprobs / log-softmax use
``LOGPROB_TOL`` below (fp32 outputs whatever the input dtype, because the merged logits are
bit-identical fp32 and only the fp32 exp / log / summation order differ).
"""

import math
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from ivl.ops import reference as ref
from ivl.ops import triton as tri

_OK, _WHY = tri.available()
if not _OK:
    pytest.skip(f"triton kernels cannot run here: {_WHY}", allow_module_level=True)

DEV = "cpu" if tri._INTERPRET else "cuda"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REMAPS = ("none", "identity", "permutation", "partial")

# Logprob / log-softmax tolerance (rtol, atol), keyed by input dtype. The same for every dtype:
# the merged fp32 logits are bit-identical to the reference, so the difference is only fp32
# exp / log rounding and summation order in log(sum exp(z - max)): a few ulp of values up to ~30.
LOGPROB_TOL = {dt: (1e-5, 2e-5) for dt in DTYPES}

# Per-row sampling settings; a batch cycles through them so one call covers every mode.
SETTINGS = (
    dict(temperature=0.0),
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=1.0, min_p=0.05),
    dict(temperature=0.9, top_k=40, top_p=0.9),
    dict(temperature=0.6, top_k=20, top_p=0.7, min_p=0.1),
)
_DEFAULTS = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)


def row_params(b: int, offset: int = 0, seed: int = 0) -> dict:
    """Per-row tensors cycling through SETTINGS, with distinct 64-bit seeds and steps."""
    g = torch.Generator().manual_seed(seed)
    picks = [SETTINGS[(r + offset) % len(SETTINGS)] for r in range(b)]
    out = {
        "temperature": torch.tensor([p.get("temperature", 1.0) for p in picks]),
        "top_k": torch.tensor([p.get("top_k", 0) for p in picks], dtype=torch.int64),
        "top_p": torch.tensor([p.get("top_p", 1.0) for p in picks]),
        "min_p": torch.tensor([p.get("min_p", 0.0) for p in picks]),
        "seed": torch.randint(-(2**62), 2**62, (b,), generator=g, dtype=torch.int64),
        "step": torch.randint(0, 2**40, (b,), generator=g, dtype=torch.int64),
    }
    return {k: v.to(DEV) for k, v in out.items()}


def make_case(b: int, v: int, dtype: torch.dtype, remap: str, seed: int = 0) -> dict:
    """Inputs for the merge ops: logits, per-row alpha (with a 0), map kind, fill."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(b, v, generator=g) * 3
    alpha = torch.rand(b, generator=g) * 2 - 0.5
    if b > 1:
        alpha[0] = 0.0  # alpha = 0 returns the base logits exactly
    kw: dict = {"alpha": alpha}
    if remap == "none":
        value = torch.randn(b, v, generator=g) * 2
    else:
        vv = v if remap != "partial" else max(1, (2 * v) // 3 + 1)
        value = torch.randn(b, vv, generator=g) * 2
        if remap == "identity":
            index, weight = torch.arange(v), torch.ones(v)
        elif remap == "permutation":
            index, weight = torch.randperm(v, generator=g), torch.rand(v, generator=g) + 0.25
        else:
            index = torch.randint(0, vv, (v,), generator=g)
            index[torch.rand(v, generator=g) < 0.25] = -1
            weight = torch.rand(v, generator=g) * 1.5
            weight[torch.rand(v, generator=g) < 0.1] = 0.0
            kw["fill"] = -2.5
        kw["vocab_map"] = (index.to(DEV), weight.to(DEV))
    kw["alpha"] = kw["alpha"].to(DEV)
    return {"base": base.to(dtype).to(DEV), "value": value.to(dtype).to(DEV), **kw}


def both_sample(case: dict, **kw) -> tuple:
    """(triton tokens, logprobs), (reference tokens, logprobs) on the same inputs."""
    args = (case["base"], case["value"])
    rest = {k: v for k, v in case.items() if k not in ("base", "value")}
    return tri.merge_sample(*args, **rest, **kw), ref.merge_sample(*args, **rest, **kw)


def assert_samples_match(got, want, dtype=torch.float32) -> None:
    (tok, lp), (rtok, rlp) = got, want
    assert tok.dtype == torch.int64 and lp.dtype == torch.float32
    assert torch.equal(tok.cpu(), rtok.cpu()), f"tokens differ:\n{tok.tolist()}\n{rtok.tolist()}"
    rtol, atol = LOGPROB_TOL[dtype]
    torch.testing.assert_close(lp.cpu(), rlp.cpu(), rtol=rtol, atol=atol, equal_nan=True)


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny blocks so that short rows take many loop iterations (block edges, Philox groups)."""
    monkeypatch.setitem(tri.CONFIG, "merge_block", 32)
    monkeypatch.setitem(tri.CONFIG, "block", 32)
    monkeypatch.setitem(tri.CONFIG, "search_block", 16)


# ---------------------------------------------------------------------------------------------
# Random stream
# ---------------------------------------------------------------------------------------------
def test_philox_stream_bit_exact(small_blocks: None) -> None:
    seed = torch.tensor([0, 1, -1, 2**62 + 12345, -(2**63)], device=DEV)
    step = torch.tensor([0, 7, -1, 2**33 + 5, 2**63 - 1], device=DEV)
    for v in (1, 5, 111):
        assert torch.equal(
            tri.philox_uniform(seed, step, v).cpu(), ref.philox_uniform(seed.cpu(), step.cpu(), v)
        )


def test_gumbel_noise_within_rounding() -> None:
    """g = -log(-log1p(-w)) differs from torch only by libm rounding: at most 1 ulp in each log
    (torch's CPU log is not always correctly rounded; the interpreter's fp64-then-round is).
    A 1-ulp change of y = -log1p(-w) ~ 1 moves g = -log(y) by ~6e-8 absolute, hence the atol."""
    seed = torch.arange(8, device=DEV) * 7919 - 3
    step = torch.arange(8, device=DEV)
    got = tri.gumbel_noise(seed, step, 4096).cpu()
    want = ref.gumbel_noise(seed.cpu(), step.cpu(), 4096)
    torch.testing.assert_close(got, want, rtol=2.4e-7, atol=1.2e-7)
    assert (got == want).float().mean() > 0.85


# ---------------------------------------------------------------------------------------------
# merge_logits: bitwise
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("remap", REMAPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_logits_bitwise(dtype: torch.dtype, remap: str) -> None:
    for b in (1, 3, 7):
        for v in (1, 5, 111, 1271):
            case = make_case(b, v, dtype, remap, seed=b * 10000 + v)
            limit = max(1, v - 3) if b != 3 else None  # padding columns masked to -inf
            kw = {k: x for k, x in case.items() if k not in ("base", "value")}
            got = tri.merge_logits(case["base"], case["value"], vocab_limit=limit, **kw)
            want = ref.merge_logits(case["base"], case["value"], vocab_limit=limit, **kw)
            assert got.dtype == torch.float32 and got.is_contiguous()
            assert torch.equal(got.cpu(), want.cpu()), (b, v, limit)


def test_merge_logits_special_values_and_strides() -> None:
    """-inf / inf / NaN, alpha = 0 rows, no value, non-contiguous rows and columns."""
    torch.manual_seed(1)
    b, v = 4, 111
    base = torch.randn(b, 2 * v).to(DEV)[:, ::2]  # column stride 2
    value = torch.randn(v, b).to(DEV).t()  # row stride 1, column stride b
    base[0, 3] = float("-inf")
    value[1, 5] = float("inf")  # alpha = 0 on row 1: must not leak
    value[2, 7] = float("nan")  # alpha != 0 on row 2: NaN propagates (row invalid downstream)
    alpha = torch.tensor([1.0, 0.0, -0.75, 2.5], device=DEV)
    assert base.stride() == (2 * v, 2) and value.stride() == (1, b)
    for val in (value, None):
        got = tri.merge_logits(base, val, alpha=alpha, vocab_limit=100)
        want = ref.merge_logits(base, val, alpha=alpha, vocab_limit=100)
        assert torch.equal(got.cpu().nan_to_num(7.0), want.cpu().nan_to_num(7.0))
        assert torch.equal(got.cpu().isnan(), want.cpu().isnan())


# ---------------------------------------------------------------------------------------------
# merged_log_softmax: close
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("dtype", "remap"),
    [
        (torch.float32, "none"),
        (torch.bfloat16, "partial"),
        (torch.float16, "permutation"),
        (torch.float32, "identity"),
    ],
    ids=str,
)
def test_merged_log_softmax_close(dtype: torch.dtype, remap: str) -> None:
    rtol, atol = LOGPROB_TOL[dtype]
    for b, v in ((1, 1), (3, 5), (7, 111), (3, 1271)):
        case = make_case(b, v, dtype, remap, seed=v)
        kw = {k: x for k, x in case.items() if k not in ("base", "value")}
        limit = max(1, v - 2)
        got = tri.merged_log_softmax(case["base"], case["value"], vocab_limit=limit, **kw)
        want = ref.merged_log_softmax(case["base"], case["value"], vocab_limit=limit, **kw)
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=rtol, atol=atol)


def test_merged_log_softmax_invalid_rows_are_nan() -> None:
    base = torch.randn(4, 37)
    base[0, 3] = float("nan")
    base[1, 4] = float("inf")
    base[2] = float("-inf")
    base[3, 36] = float("nan")  # past vocab_limit: masked, row stays valid
    got = tri.merged_log_softmax(base.to(DEV), vocab_limit=36).cpu()
    want = ref.merged_log_softmax(base, vocab_limit=36)
    assert got[:3].isnan().all() and want[:3].isnan().all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# merge_sample: same tokens as the reference
# ---------------------------------------------------------------------------------------------
SAMPLE_CASES = [
    # (dtype, remap, B, V)
    (torch.float32, "none", 7, 1271),
    (torch.float32, "partial", 3, 111),
    (torch.bfloat16, "none", 7, 111),
    (torch.bfloat16, "permutation", 3, 1271),
    (torch.float16, "identity", 7, 111),
    (torch.float16, "partial", 3, 5),
    (torch.float32, "permutation", 1, 5),
    (torch.bfloat16, "identity", 1, 1271),
    (torch.float16, "none", 3, 1),
]


@pytest.mark.parametrize(("dtype", "remap", "b", "v"), SAMPLE_CASES, ids=str)
def test_merge_sample_tokens_equal(dtype: torch.dtype, remap: str, b: int, v: int) -> None:
    case = make_case(b, v, dtype, remap, seed=b * 7 + v)
    for offset in (0, 3) if b < 7 else (0,):
        params = row_params(b, offset=offset, seed=v + offset)
        limit = v - 2 if v > 4 else None
        got, want = both_sample(case, vocab_limit=limit, **params)
        assert_samples_match(got, want, dtype)
        assert ((got[0] >= 0) & (got[0] < (limit or v))).all()


def test_merge_sample_scalar_params_and_steps() -> None:
    """Python-scalar settings broadcast to every row; different steps give different draws."""
    case = make_case(3, 111, torch.float32, "none", seed=5)
    for kw in (dict(temperature=0.8, top_k=7, seed=2**64 - 1), dict(top_p=0.6, seed=-3, step=9)):
        assert_samples_match(*both_sample(case, **kw))
    toks = {tuple(both_sample(case, seed=1, step=s)[0][0].tolist()) for s in range(4)}
    assert len(toks) > 1


def test_merge_sample_noncontiguous_and_small_blocks(small_blocks: None) -> None:
    """Row / column strides and many blocks per pass (block 32, search block 16)."""
    torch.manual_seed(2)
    b, v = 7, 111
    base = (torch.randn(b, 3 * v) * 2).to(DEV)[:, 1::3]
    value = (torch.randn(v, b) * 2).to(DEV).t()
    assert base.stride() == (3 * v, 3) and value.stride() == (1, b)
    params = row_params(b, seed=11)
    assert_samples_match(
        *both_sample({"base": base, "value": value}, alpha=0.6, vocab_limit=105, **params)
    )


def test_merge_sample_skipped_blocks(small_blocks: None) -> None:
    """Widely spread logits: blocks that cannot beat the running best skip their random numbers
    (g < 23); the draws must be exactly those of the full computation."""
    g = torch.Generator().manual_seed(12)
    row = torch.randn(1, 128, generator=g)
    row[0, 5], row[0, 70], row[0, 100:110] = 50.0, 45.0, 30.0  # blocks 0, 2, 3 of 32
    for b, kw in ((16, dict()), (16, dict(min_p=1e-4, temperature=2.0)), (3, dict(top_k=12))):
        base, steps = row.expand(b, -1).to(DEV), torch.arange(b, device=DEV)
        assert_samples_match(*both_sample({"base": base, "value": None}, step=steps, **kw))


def test_merge_sample_ties_at_filter_boundaries() -> None:
    """Integer logits: many exact ties at the top-k / top-p / min-p boundaries (ties kept)."""
    g = torch.Generator().manual_seed(3)
    b, v = 7, 64
    base = torch.randint(-3, 3, (b, v), generator=g).float()
    base[:, :4] = 2.0  # a 4-way tie for the maximum
    params = row_params(b, seed=4)
    params["top_k"] = torch.tensor([0, 3, 5, 6, 20, 2, 1], device=DEV)
    params["top_p"] = torch.tensor([0.3, 1.0, 0.5, 0.99, 0.7, 0.25, 1.0], device=DEV)
    params["min_p"] = torch.tensor([0.0, 0.0, 0.2, 0.0, 0.05, 0.0, 1.0], device=DEV)
    params["temperature"] = torch.tensor([1.0, 0.5, 1.0, 2.0, 1.0, 1.0, 1.0], device=DEV)
    assert_samples_match(*both_sample({"base": base.to(DEV), "value": None}, **params))


def test_merge_sample_invalid_rows() -> None:
    """NaN / +inf / all -inf rows -> token -1, logprob NaN; masked NaN and alpha = 0 are valid."""
    b, v = 6, 37
    base = torch.randn(b, v)
    value = torch.randn(b, v)
    base[0, 3] = float("nan")
    base[1, 4] = float("inf")
    base[2] = float("-inf")
    base[3, 36] = float("nan")  # past vocab_limit
    base[4, :-1] = float("-inf")  # a single finite logit, then masked: no finite logit
    value[5, 2] = float("inf")  # alpha = 0 for row 5
    alpha = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    case = {"base": base.to(DEV), "value": value.to(DEV), "alpha": alpha.to(DEV)}
    for kw in (dict(temperature=0.0), dict(temperature=1.0), dict(top_k=3, top_p=0.9)):
        got, want = both_sample(case, vocab_limit=36, **kw)
        assert_samples_match(got, want)
        assert got[0][:5].tolist() == [-1, -1, -1, got[0][3].item(), -1]
        assert 0 <= got[0][3] < 36 and 0 <= got[0][5] < 36


def test_merge_sample_top_p_boundary_mismatch_rate() -> None:
    """top_p set to (the fp32 rounding of) a row's exact cumulative mass: the adversarial case
    for the boundary test. The kernel sums fp64 exps like the reference, so its masses agree to
    ~1e-16 and the fp32 rounding of top_p (~6e-8 away) decides both the same way: 0 mismatches
    expected; the bound leaves room for a GPU's libdevice exp (also fp64)."""
    g = torch.Generator().manual_seed(6)
    b, v = 24, 16
    base = torch.randn(b, v, generator=g) * 2
    probs = torch.softmax(base.double(), -1).sort(-1, descending=True).values
    cut = torch.randint(1, 6, (b,), generator=g)
    top_p = probs.cumsum(-1).gather(1, cut[:, None])[:, 0].float()  # boundary of token `cut`
    kw = dict(top_p=top_p.to(DEV), seed=torch.arange(b, device=DEV))
    (tok, _), (rtok, _) = both_sample({"base": base.to(DEV), "value": None}, **kw)
    mismatches = (tok.cpu() != rtok.cpu()).sum().item()
    assert mismatches <= 1, f"{mismatches}/{b} boundary rows differ"


# ---------------------------------------------------------------------------------------------
# Distribution: many steps of one row
# ---------------------------------------------------------------------------------------------
def _frequency_check(base: torch.Tensor, value: torch.Tensor, n: int, **kw) -> None:
    """Draw n tokens (one per step) and compare with the filtered reference distribution."""
    rows_b, rows_v = base.to(DEV).expand(n, -1), value.to(DEV).expand(n, -1)  # row stride 0
    steps = torch.arange(n, device=DEV)
    tok, _ = tri.merge_sample(rows_b, rows_v, seed=1234, step=steps, **kw)
    tok = tok.cpu()
    z = ref.merge_logits(base, value, alpha=kw.get("alpha", 1.0))
    t = kw.get("temperature", 1.0)
    scaled = z / t
    keep = ref.keep_mask(
        scaled,
        torch.tensor([kw.get("top_k", 0)]),
        torch.tensor([kw.get("top_p", 1.0)]),
        torch.tensor([kw.get("min_p", 0.0)]),
    )[0]
    p = torch.where(keep, torch.softmax(torch.where(keep, scaled[0], -torch.inf), -1), 0.0)
    freq = torch.bincount(tok, minlength=base.shape[1]).double() / n
    assert freq[~keep].sum() == 0, "a filtered-out token was drawn"
    cos = torch.nn.functional.cosine_similarity(freq, p.double(), dim=0).item()
    assert cos > 0.99, (cos, freq.tolist(), p.tolist())


def test_frequency_plain_sampling() -> None:
    base = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    value = torch.tensor([[0.5, -0.5, 0.0, 1.0, 0.0, 0.0]])
    _frequency_check(base, value, 200, alpha=0.8, temperature=0.9)


def test_frequency_filtered() -> None:
    base = torch.tensor([[2.5, 1.5, 1.0, 0.2, 0.0, -0.5, -2.0, -4.0]])
    value = torch.zeros(1, 8)
    _frequency_check(base, value, 120, top_k=6, top_p=0.9, min_p=0.05)


@pytest.mark.slow
def test_frequency_many_draws_slow() -> None:
    base = torch.randn(1, 24, generator=torch.Generator().manual_seed(9)) * 1.5
    value = torch.randn(1, 24, generator=torch.Generator().manual_seed(10))
    _frequency_check(base, value, 2000, alpha=0.5, temperature=1.1)
    _frequency_check(base, value, 600, alpha=0.5, top_k=10, top_p=0.85, min_p=0.02)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_frequency_million_draws() -> None:
    """Issue 3's distribution check: 1e6 draws of one row per setting."""
    g = torch.Generator().manual_seed(13)
    base = torch.randn(1, 200, generator=g) * 2
    value = torch.randn(1, 200, generator=g)
    for kw in (
        dict(temperature=1.0),
        dict(temperature=0.8, top_k=50),
        dict(top_p=0.9),
        dict(temperature=1.2, top_k=100, top_p=0.8, min_p=0.01),
    ):
        _frequency_check(base, value, 1_000_000, alpha=0.5, **kw)


# ---------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile
# ---------------------------------------------------------------------------------------------
def test_opcheck_registered_ops() -> None:
    b, v = 2, 9
    base, value = torch.randn(b, v, device=DEV), torch.randn(b, v, device=DEV)
    alpha = torch.full((b,), 0.5, device=DEV)
    common = (base, value, alpha, None, None, 0.0, v)
    torch.library.opcheck(torch.ops.ivl_triton.merge_logits.default, common)
    torch.library.opcheck(torch.ops.ivl_triton.merged_log_softmax.default, common)
    p = {k: x for k, x in row_params(b, offset=1).items()}
    args = (*common, p["temperature"], p["top_k"], p["top_p"], p["min_p"], p["seed"], p["step"])
    torch.library.opcheck(torch.ops.ivl_triton.merge_sample.default, args)


def _compile_check() -> None:
    torch._dynamo.reset()
    case = make_case(3, 37, torch.float32, "permutation", seed=8)
    params = row_params(3, seed=8)

    def step_fn(base, value, alpha, index, weight, temperature, top_k, top_p, min_p, seed, step):
        return tri.merge_sample(
            base,
            value,
            alpha=alpha,
            vocab_map=(index, weight),
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            seed=seed,
            step=step,
        )

    compiled = torch.compile(step_fn, fullgraph=True)
    index, weight = case["vocab_map"]
    args = (case["base"], case["value"], case["alpha"], index, weight)
    got = compiled(*args, *params.values())
    want = ref.merge_sample(
        case["base"].cpu(),
        case["value"].cpu(),
        alpha=case["alpha"].cpu(),
        vocab_map=(index.cpu(), weight.cpu()),
        **{k: x.cpu() for k, x in params.items()},
    )
    assert_samples_match(got, want)


@pytest.mark.skipif(not tri._INTERPRET, reason="the GPU variant is test_gpu_torch_compile")
def test_torch_compile_fullgraph_interpreter() -> None:
    """Opaque custom op (the interpreter cannot run on fake tensors): traces with fullgraph."""
    _compile_check()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_torch_compile() -> None:
    """triton_op + wrap_triton: Inductor sees the kernels."""
    _compile_check()


_COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ivl.ops import triton as T

assert not T._INTERPRET
PTRS = {"tok_ptr": "*i64", "idx_ptr": "*i64", "topk_ptr": "*i64", "seed_ptr": "*i64",
        "step_ptr": "*i64", "lminp_ptr": "*fp64", "base_ptr": "*bf16", "value_ptr": "*fp16"}
CONST = {"BLOCK": 2048, "SBLOCK": 256, "HAS_VALUE": True, "HAS_MAP": True, "CUDA": True}

def build(kernel):
    sig, consts = {}, {}
    for p in kernel.params:
        if p.is_constexpr:
            sig[p.name], consts[p.name] = "constexpr", CONST[p.name]
        elif p.name.endswith("_ptr"):
            sig[p.name] = PTRS.get(p.name, "*fp32")
        else:
            sig[p.name] = "i32" if p.name in ("V", "limit", "Vv") else "i64"
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})

merge = build(T._merge_kernel).asm["ptx"]
assert "mul.rn.f32" in merge and "fma" not in merge, "the merge must not contract into an FMA"
build(T._log_softmax_kernel)
sample = build(T._sample_kernel).asm["ptx"]
assert "mul.rn.f32" in sample and "add.rn.f32" in sample and "div.rn.f32" in sample
print("compiled")
"""


_INDUCTOR_SCRIPT = r"""
import importlib.util, os, tempfile
from torch._inductor.codegen.wrapper import (
    user_defined_triton_kernel_transitive_closure_source_code as closure,
)
from ivl.ops import triton as T

assert not T._INTERPRET
HEADER = "import triton\nimport triton.language as tl\n"
for kernel in (T._merge_kernel, T._log_softmax_kernel, T._sample_kernel, T._noise_kernel):
    src = closure(kernel)
    path = os.path.join(tempfile.mkdtemp(), kernel.__name__ + ".py")
    with open(path, "w") as f:
        f.write(HEADER + ("" if src.lstrip().startswith("@") else "@triton.jit\n") + src)
    spec = importlib.util.spec_from_file_location(kernel.__name__, path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
print("pasted")
"""


def _run_compiled(script: str) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh process with compiled (not interpreted) Triton kernels."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the 3.9 default, stated: the asm must win over it
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


def _needs_nvidia_triton() -> None:
    triton = pytest.importorskip("triton")
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton build has no NVIDIA backend")


@pytest.mark.skipif(not tri._INTERPRET, reason="on a GPU the other tests compile the kernels")
def test_kernels_compile_for_sm90_without_a_gpu() -> None:
    """The compiled path, which the interpreter never runs: every kernel lowers to PTX and a
    cubin for sm_90 (H100 / H200) with Triton's bundled LLVM and ptxas, in a fresh process
    without TRITON_INTERPRET; the merge keeps its rounded products (no FMA)."""
    _needs_nvidia_triton()
    run = _run_compiled(_COMPILE_SCRIPT)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-4000:]


@pytest.mark.skipif(not tri._INTERPRET, reason="on a GPU test_gpu_torch_compile runs Inductor")
def test_kernels_survive_inductors_source_paste() -> None:
    """torch.compile (Inductor) pastes the source of a user kernel and of every jit function it
    names into a generated module. Names the pasted code needs must resolve there: aliases of
    Triton's own tl.max / tl.sum did not (NameError 'core', seen on an H200)."""
    _needs_nvidia_triton()
    run = _run_compiled(_INDUCTOR_SCRIPT)
    assert run.returncode == 0 and "pasted" in run.stdout, run.stderr[-4000:]


# ---------------------------------------------------------------------------------------------
# GPU: the big shapes
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("v", [111, 1271, 32000, 49152, 151936, 262144])
def test_gpu_big_shapes(v: int) -> None:
    mismatches, total = 0, 0
    for b in (1, 7, 99):
        for dtype, remap in zip(DTYPES * 2, REMAPS + REMAPS[:2], strict=False):
            case = make_case(b, v, dtype, remap, seed=b + v)
            kw = {k: x for k, x in case.items() if k not in ("base", "value")}
            got = tri.merge_logits(case["base"], case["value"], **kw)
            want = ref.merge_logits(case["base"], case["value"], **kw)
            assert torch.equal(got, want)
            lsm = tri.merged_log_softmax(case["base"], case["value"], **kw)
            rtol, atol = LOGPROB_TOL[dtype]
            torch.testing.assert_close(lsm, torch.log_softmax(want, -1), rtol=rtol, atol=atol)
            params = row_params(b, offset=v % 7, seed=b)
            (tok, lp), (rtok, rlp) = both_sample(case, **params)
            assert ((tok >= 0) & (tok < v)).all()
            mismatches += (tok != rtok).sum().item()
            total += b
            torch.testing.assert_close(lp, rlp, rtol=rtol, atol=atol, equal_nan=True)
    # libdevice logf / log1pf are within 1 ulp of torch's: a token differs only on a near-tie
    # of two perturbed logits (probability ~1e-6 per row).
    assert mismatches <= max(1, math.ceil(total * 0.01)), f"{mismatches}/{total} tokens differ"
