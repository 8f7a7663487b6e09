"""Triton kernels for the merge ops: ``merge_logits``, ``merged_log_softmax``, ``merge_sample``.

Same signatures and semantics as ``ivl.ops.reference`` (the spec: merge rule, Philox-4x32-10
stream, filters with ties, Gumbel-max, logprobs, invalid rows). On a CUDA machine the kernels take
CUDA tensors; with ``TRITON_INTERPRET=1`` in the environment *before this module is imported*
(Triton decides interpreted vs compiled when a kernel is decorated) they run in Triton's NumPy
interpreter on CPU tensors, which is how the fast test suite checks them without a GPU.

Kernel structure (one program per row for the row-wide ops, every pass a blocked loop over the
vocabulary with int64 offsets and the row / column strides; nothing materialises a
``next_power_of_2(V)`` block or a probability row; block sizes in ``CONFIG``):

- ``merge_logits``: a 2-D grid (row, vocabulary block), purely elementwise.
- ``merged_log_softmax``: pass 1 merges and keeps an online max / sum of exp; pass 2 writes
  ``(z - max) - log(sum)``.
- ``merge_sample``: pass 1 merges and keeps max, argmax (lowest index on ties), the online sum for
  the logprob and an invalid-row flag; when the row samples without filters (temperature > 0,
  top-k / top-p / min-p off) the Gumbel-max draw is fused into it, so plain sampling reads the
  logits once. Greedy and invalid rows are done after pass 1. Filtered rows then find their
  threshold value without sorting (``_threshold``): top-k by an exact radix select on the
  order-preserving 32-bit key of ``z / T``, 4 bits per pass (at most 8 passes, fewer when a pass
  leaves a single distinct key), top-p by the same radix walk over probability mass (at most 8
  more); min-p is a per-element test in the final pass, which draws Gumbel-max over the kept ids.
  Worst case 18 passes over the row; the merge is recomputed in each (no scratch row; on a GPU the
  re-reads mostly hit L2). The Gumbel-max skips the random numbers of any block whose kept ids
  cannot beat the running best (g < 23), so outside a small kept set the final pass only reads.

Rounding, and where it can differ from the reference:

- The merge is bit-exact: ``s = alpha * weight`` and ``s * value`` are each rounded to fp32 before
  the add. On CUDA the products are ``mul.rn.f32`` in inline PTX: an instruction with an explicit
  rounding mode is never contracted into an FMA by LLVM or ptxas, whatever ``enable_fp_fusion``
  says (Triton 3.9 still fuses by default). ``z/T + g`` is an ``add.rn.f32`` for the same reason.
  The interpreter runs NumPy, which never fuses.
- Philox and the uniform ``w`` are bit-exact (uint32 arithmetic, ``umulhi`` for the high halves).
- ``z / T`` is ``div_rn`` (IEEE division, as torch's). The Gumbel transform is libdevice
  ``log1pf`` / ``logf`` on CUDA (within 1 ulp each) and, in the interpreter (no log1p there), the
  same steps in fp64 rounded to fp32 (correctly rounded; torch's CPU log is not always): the noise
  is within ~1 ulp of torch's, so a token can differ only when two perturbed logits tie to ~1e-7.
- top-k is exact (the threshold is the k-th largest value itself, ties kept). top-p masses are
  fp64 ``exp(z/T - max)`` summed in fp64, as the reference, so the boundary test agrees with the
  reference's fp64 cumulative sums to ~1e-16 (even with top_p set to a row's exact cumulative
  mass). min-p is ``z/T - max >= log(min_p)`` in fp64, equivalent to the reference's fp64
  ``exp(z/T - max) >= min_p`` up to ~1e-16.
- Logprobs are ``(z[tok] - max) - log(sum exp(z - max))`` with fp32 exp / log: within ~1e-5 of
  torch's ``log_softmax``, not bit-equal.
- Temperatures so small that ``z / T`` overflows to inf are outside the contract (the reference
  itself degenerates there); the token is then still a valid id.

torch.compile: the ops are registered as ``torch.ops.ivl_triton.*``. On CUDA they are
``torch.library.triton_op`` (Inductor sees the kernels); in the interpreter they are opaque
``torch.library.custom_op`` with fake impls, because the interpreter runs kernels eagerly on the
tensors it is given and cannot be traced with fake tensors. Under torch.compile the wrappers
check shapes only (value checks would need a host sync), as for tensors already on a GPU.
"""

import types

import torch

from ._params import (
    alpha_rows,
    check_logits,
    check_merge_inputs,
    map_tensors,
    rows,
    sampling_rows,
)

try:
    import triton
    import triton.language as tl

    # the backend's libdevice is substituted for this stub module when a kernel is compiled
    from triton.language.extra import libdevice

    _IMPORT_ERROR = ""
except ImportError as exc:  # the module still imports; available() says why it can't run
    triton = None
    tl = types.SimpleNamespace(constexpr=None)
    libdevice = None
    _IMPORT_ERROR = f"triton is not installed ({exc}); pip install triton"

__all__ = ["available", "merge_logits", "merge_sample", "merged_log_softmax"]

# Decided once, like Triton does when it decorates the kernels below.
_INTERPRET = triton is not None and bool(triton.knobs.runtime.interpret)


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


def _jit_helper(fn):
    """``triton.jit`` for device functions called from kernels.

    In the interpreter a kernel is plain Python run against a patched ``triton.language``, and
    every call of a nested jit function re-patches it (~2 ms per call); undecorated helpers run
    the same code without that cost. Compiled, they are ordinary jit functions.
    """
    return fn if _INTERPRET or triton is None else triton.jit(fn)


def available() -> tuple[bool, str]:
    """Whether these kernels can run here, and why (not)."""
    if triton is None:
        return False, _IMPORT_ERROR
    if _INTERPRET:
        return True, "TRITON_INTERPRET=1: kernels run in the Triton interpreter on CPU tensors"
    if torch.version.hip:
        return False, "ROCm is not supported yet (the no-FMA merge uses inline PTX)"
    if not torch.cuda.is_available():
        return False, (
            "no CUDA device (to run the kernels on CPU tensors in the Triton interpreter, set "
            "TRITON_INTERPRET=1 before ivl.ops.triton is imported)"
        )
    return True, f"CUDA device {torch.cuda.get_device_name()}"


# ---------------------------------------------------------------------------------------------
# Launch configuration. Interpreter: big blocks (NumPy cost is per operation, not per element).
# GPU: 2048-wide streaming blocks, 256-wide search blocks (the search works on [SBLOCK, 16] tiles).
# Tests may shrink these to exercise many loop iterations on small rows.
# ---------------------------------------------------------------------------------------------
CONFIG = (
    {"merge_block": 1024, "block": 1024, "search_block": 1024, "warps": 4}
    if _INTERPRET
    else {"merge_block": 1024, "block": 2048, "search_block": 256, "warps": 8}
)


def _block(configured: int, v: int) -> int:
    """The configured block, or less for short rows (never wider than 16 or the row rounded up
    to a power of two): the loops still run over blocks, this only trims idle lanes."""
    return min(configured, max(16, triton.next_power_of_2(v)))


# ---------------------------------------------------------------------------------------------
# Device helpers. They use tl.full rather than tl.zeros: the latter is a jit function, which the
# interpreter re-patches triton.language for on every call (see _jit_helper).
# ---------------------------------------------------------------------------------------------
if _INTERPRET:
    # tl.sum / max / min are jit functions: in the interpreter each call re-patches
    # triton.language. Calling tl.reduce with the same combine functions skips that and hits the
    # interpreter's NumPy fast paths (np.sum / np.nanmax / np.nanmin).
    def _rsum(x, axis=None):
        return tl.reduce(x, axis, tl.standard._sum_combine)

    def _rmax(x, axis=None):
        return tl.reduce(x, axis, tl.standard._elementwise_max)

    def _rmin(x, axis=None):
        return tl.reduce(x, axis, tl.standard._elementwise_min)

elif triton is not None:
    # Wrappers, not aliases of tl.sum / max / min: torch.compile (Inductor) pastes the source of
    # every jit function a kernel names into its generated module, and Triton's own reductions
    # use names of their module (`core`) that the pasted copy lacks; calls through `tl` it keeps.
    @triton.jit
    def _rsum(x, axis=None):
        return tl.sum(x, axis)

    @triton.jit
    def _rmax(x, axis=None):
        return tl.max(x, axis)

    @triton.jit
    def _rmin(x, axis=None):
        return tl.min(x, axis)


@_jit_helper
def _mul_rn(a, b, CUDA: tl.constexpr):
    """fp32 product rounded on its own: never fused into an FMA with a following add."""
    if CUDA:
        return tl.inline_asm_elementwise(
            "mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return a * b


@_jit_helper
def _add_rn(a, b, CUDA: tl.constexpr):
    """fp32 sum rounded on its own: ptxas never contracts it with a multiply feeding it."""
    if CUDA:
        return tl.inline_asm_elementwise(
            "add.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return a + b


@_jit_helper
def _merged(
    base_row,  # pointer to base[row, 0]
    sb1,  # base column stride
    value_row,  # pointer to value[row, 0] (unused without a value)
    sv1,
    idx_ptr,  # [Vb] int64 map index (unused without a map)
    w_ptr,  # [Vb] fp32 map weight
    offs,  # [BLOCK] int32 base ids
    limit,  # vocab_limit
    Vv,  # value columns (bounds the map)
    alpha,  # fp32 scalar
    fill_term,  # fp32 scalar: alpha * fill, rounded
    HAS_VALUE: tl.constexpr,
    HAS_MAP: tl.constexpr,
    CUDA: tl.constexpr,
):
    """Merged fp32 logits of one block (the spec's merge rule); -inf at and past ``limit``."""
    live = offs < limit
    offs64 = offs.to(tl.int64)
    # Scalars are broadcast before they are compared: the Triton 3.9 interpreter gives a scalar
    # comparison the dtype of its operands, so splatting it to a block yields floats, not bools
    # (runtime/interpreter.py binary_op / create_splat; no upstream issue found).
    alpha = tl.broadcast_to(alpha, offs.shape)
    fill_term = tl.broadcast_to(fill_term, offs.shape)
    z = tl.load(base_row + offs64 * sb1, mask=live, other=0.0).to(tl.float32)
    if HAS_VALUE:
        if HAS_MAP:
            i = tl.load(idx_ptr + offs64, mask=live, other=-1)
            w = tl.load(w_ptr + offs64, mask=live, other=0.0)
            s = _mul_rn(alpha, w, CUDA)
            mapped = i >= 0
            inside = i < Vv  # a corrupt map yields NaN (row invalid), never an out-of-range read
            use = live & mapped & inside & (s != 0.0)
            v = tl.load(value_row + i * sv1, mask=use, other=0.0).to(tl.float32)
            z = tl.where(live & (i < 0) & (fill_term != 0.0), z + fill_term, z)
            z = tl.where(use, z + _mul_rn(s, v, CUDA), z)
            z = tl.where(live & mapped & ~inside, float("nan"), z)
        else:
            use = live & (alpha != 0.0)  # alpha = 0 ignores inf / NaN value logits
            v = tl.load(value_row + offs64 * sv1, mask=use, other=0.0).to(tl.float32)
            z = tl.where(use, z + _mul_rn(alpha, v, CUDA), z)
    return tl.where(live, z, float("-inf"))


@_jit_helper
def _philox_block(start, k0, k1, c2, c3, BLOCK: tl.constexpr):
    """uint32 [BLOCK]: the stream's words for vocabulary ids start .. start + BLOCK - 1.

    Philox-4x32-10 once per group of four ids (counter (v >> 2, 0, step lo, step hi),
    key (seed lo, seed hi), key bumped between rounds), the four words interleaved so that id v
    gets word v & 3. ``start`` must be a multiple of 4.
    """
    c0 = (start // 4 + tl.arange(0, BLOCK // 4)).to(tl.uint32)
    c1 = tl.full([BLOCK // 4], 0, dtype=tl.uint32)
    c2 = c1 + c2
    c3 = c1 + c3
    m0 = tl.full([BLOCK // 4], 0xD2511F53, dtype=tl.uint32)
    m1 = tl.full([BLOCK // 4], 0xCD9E8D57, dtype=tl.uint32)
    # uint32 arithmetic wraps on purpose: sanitize_overflow=False (also keeps the interpreter,
    # which sanitises by default, from checking every product in int64)
    for rnd in tl.static_range(10):
        if rnd > 0:
            k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
            k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
        hi0 = tl.umulhi(c0, m0)
        lo0 = tl.mul(c0, m0, sanitize_overflow=False)
        hi1 = tl.umulhi(c2, m1)
        lo1 = tl.mul(c2, m1, sanitize_overflow=False)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    # [N, 2, 2] with [n, a, b] = word 2a + b, so the row-major flattening is lane order
    words = tl.join(tl.join(c0, c2), tl.join(c1, c3))
    return tl.reshape(words, [BLOCK])


@_jit_helper
def _gumbel(x, NATIVE: tl.constexpr):
    """Standard Gumbel noise from 32 random bits, as the spec: -log(-log1p(-min(w, 1 - 2^-24)))."""
    # x * 2^-32 is exact, so an FMA here could not change the result
    w = x.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10
    w = tl.minimum(w, 0.99999994039535522)
    if NATIVE:
        g = -libdevice.log(-libdevice.log1p(-w))  # fp32, within 1 ulp each
    else:
        # The interpreter has no log1p. In fp64, 1 - w is exact (w has 24 significant bits and
        # w >= 2^-33), so each step below is the correctly rounded fp32 result (as torch's CPU
        # log1p is for ~99% of inputs and its log for ~92%).
        l1 = tl.log(1.0 - w.to(tl.float64)).to(tl.float32)
        g = -tl.log((-l1).to(tl.float64)).to(tl.float32)
    return g


@_jit_helper
def _exp64(x, NATIVE: tl.constexpr):
    """fp64 exp (libdevice on CUDA, NumPy in the interpreter)."""
    if NATIVE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@_jit_helper
def _gumbel_max_step(
    sc,  # [BLOCK] fp32 z / T
    z,  # [BLOCK] fp32 merged logits
    keep,  # [BLOCK] bool: candidates (in range, not filtered out)
    offs,
    start,
    k0,
    k1,
    c2,
    c3,
    best,  # running max of z / T + g over the kept ids so far
    tok,  # its id (lowest on ties: blocks come in order and the update is strict)
    z_tok,  # its merged logit (for the logprob)
    BLOCK: tl.constexpr,
    CUDA: tl.constexpr,
):
    """Fold one block into a running Gumbel-max.

    g < 23 always (w >= 2^-33), so a block whose kept ids all have fl(z/T + 23) < best cannot
    win or tie (rounding is monotone) and skips the random numbers: after the first blocks of a
    peaked row, and for every block outside a small top-k / top-p set, the pass only reads.
    """
    hopeful = keep & (sc + 23.0 >= best)
    if _rmax(hopeful.to(tl.int32)) > 0:
        gum = _gumbel(_philox_block(start, k0, k1, c2, c3, BLOCK), CUDA)
        noisy = tl.where(keep, _add_rn(sc, gum, CUDA), float("-inf"))
        nb = _rmax(noisy)
        ni = _rmin(tl.where(noisy == nb, offs, 2147483647))
        nz = _rmax(tl.where(offs == ni, z, float("-inf")))
        better = nb > best
        tok = tl.where(better, ni, tok)
        z_tok = tl.where(better, nz, z_tok)
        best = tl.maximum(best, nb)
    return best, tok, z_tok


@_jit_helper
def _order_key(x):
    """Order-preserving uint32 key of fp32 values (larger value, larger key; -0 < +0)."""
    b = x.to(tl.uint32, bitcast=True)
    return tl.where((b >> 31) != 0, ~b, b | 0x80000000)


@_jit_helper
def _key_value(k):
    """Inverse of ``_order_key``."""
    b = tl.where((k >> 31) != 0, k ^ 0x80000000, ~k)
    return b.to(tl.float32, bitcast=True)


@_jit_helper
def _threshold(
    base_row,
    sb1,
    value_row,
    sv1,
    idx_ptr,
    w_ptr,
    V,
    limit,
    Vv,
    alpha,
    fill_term,
    temp,  # fp32 temperature (> 0)
    floor,  # fp32: only z / T >= floor take part (top-p runs on the top-k set)
    smax,  # fp32 max of z / T
    goal_k,  # int64 k (MODE 0)
    goal_p,  # fp64 top_p (MODE 1)
    MODE: tl.constexpr,  # 0: top-k value, 1: top-p value
    SBLOCK: tl.constexpr,
    HAS_VALUE: tl.constexpr,
    HAS_MAP: tl.constexpr,
    CUDA: tl.constexpr,
):
    """The filter threshold of one row, as an fp32 value of z / T, without sorting.

    A radix walk over the order-preserving 32-bit key of z / T, 4 bits per pass (at most 8 blocked
    passes over the row). Each pass histograms, for the members whose key matches the prefix
    found so far, the next digit: counts, lowest / highest key and (top-p) mass exp(z/T - max) per
    digit. Then, with A the count / mass of members strictly above the current group:

    - top-k (MODE 0) wants the k-th largest value: the digit is the highest b with
      A + count(digit >= b) >= k;
    - top-p (MODE 1) wants the smallest value x whose mass strictly above is < top_p * total:
      the digit is the lowest non-empty b with A + mass(digit > b) < top_p * total (the highest
      key in such a bin qualifies, so the answer lies in it).

    The walk stops early when the chosen bin holds a single distinct key.
    """
    bins = tl.arange(0, 16)
    prefix = tl.full([], 0, dtype=tl.uint32)
    above_n = tl.full([], 0, dtype=tl.int64)
    above_m = tl.full([], 0.0, dtype=tl.float64)
    target = tl.full([], 0.0, dtype=tl.float64)
    done = tl.full([], 0, dtype=tl.int32)
    result = tl.full([], 0, dtype=tl.uint32)
    zero_u = tl.full([SBLOCK, 16], 0, dtype=tl.uint32)
    ones_u = tl.full([SBLOCK, 16], 0xFFFFFFFF, dtype=tl.uint32)
    for level in range(8):
        if done == 0:
            shift = (28 - 4 * level) + tl.full([], 0, dtype=tl.int32)  # a tensor in both modes
            # mask of the key bits above this digit (shift + 4 may be 32: do it in 64 bits)
            grp = ((tl.full([], 0xFFFFFFFF, dtype=tl.int64) << (shift + 4)) & 0xFFFFFFFF).to(
                tl.uint32
            )
            cnt = tl.full([16], 0, dtype=tl.int32)
            mass = tl.full([16], 0.0, dtype=tl.float64)
            kmax = tl.full([16], 0, dtype=tl.uint32)
            kmin = tl.full([16], 0xFFFFFFFF, dtype=tl.uint32)
            for start in range(0, V, SBLOCK):
                offs = start + tl.arange(0, SBLOCK)
                z = _merged(
                    base_row,
                    sb1,
                    value_row,
                    sv1,
                    idx_ptr,
                    w_ptr,
                    offs,
                    limit,
                    Vv,
                    alpha,
                    fill_term,
                    HAS_VALUE,
                    HAS_MAP,
                    CUDA,
                )
                sc = tl.math.div_rn(z, temp)
                key = _order_key(sc)
                member = (offs < V) & ((key & grp) == prefix)
                if MODE == 1:
                    member = member & (sc >= floor)
                digit = ((key >> shift.to(tl.uint32)) & 15).to(tl.int32)
                hit = member[:, None] & (digit[:, None] == bins[None, :])  # [SBLOCK, 16]
                cnt += _rsum(hit.to(tl.int32), axis=0)
                kmax = tl.maximum(kmax, _rmax(tl.where(hit, key[:, None], zero_u), axis=0))
                kmin = tl.minimum(kmin, _rmin(tl.where(hit, key[:, None], ones_u), axis=0))
                if MODE == 1:
                    # fp64 like the reference: the boundary test then agrees with its fp64
                    # cumulative sums to ~1e-16 instead of fp32's ~1e-7
                    e = _exp64(sc.to(tl.float64) - smax.to(tl.float64), CUDA)
                    mass += _rsum(tl.where(hit, e[:, None], 0.0), axis=0)
            if MODE == 0:
                # ge[b] = members with digit >= b; non-increasing in b, ge[0] >= k - above_n
                ge = _rsum(tl.where(bins[None, :] >= bins[:, None], cnt[None, :], 0), axis=1)
                pick = _rsum((ge >= goal_k - above_n).to(tl.int32)) - 1
                above_n += _rsum(tl.where(bins > pick, cnt, 0)).to(tl.int64)
            else:
                target = tl.where(shift == 28, goal_p * _rsum(mass), target)
                gt = _rsum(tl.where(bins[None, :] > bins[:, None], mass[None, :], 0.0), axis=1)
                ok = (above_m + gt < target) & (cnt > 0)
                pick = _rmin(tl.where(ok, bins, 16))
                above_m += _rsum(tl.where(bins > pick, mass, 0.0))
            prefix = prefix | (pick.to(tl.uint32) << shift.to(tl.uint32))
            hi = _rmax(tl.where(bins == pick, kmax, tl.full([16], 0, dtype=tl.uint32)))
            lo = _rmin(tl.where(bins == pick, kmin, tl.full([16], 0xFFFFFFFF, dtype=tl.uint32)))
            if hi == lo:
                done = done + 1
                result = hi
    return _key_value(result)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@_jit
def _merge_kernel(
    out_ptr,  # [B, V] fp32, contiguous
    base_ptr,
    sb0,
    sb1,
    value_ptr,
    sv0,
    sv1,
    idx_ptr,
    w_ptr,
    alpha_ptr,  # [B] fp32
    fill_ptr,  # [B] fp32 alpha * fill
    V,
    limit,
    Vv,
    BLOCK: tl.constexpr,
    HAS_VALUE: tl.constexpr,
    HAS_MAP: tl.constexpr,
    CUDA: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    alpha = tl.load(alpha_ptr + row)
    fill_term = tl.load(fill_ptr + row)
    z = _merged(
        base_ptr + row * sb0,
        sb1,
        value_ptr + row * sv0,
        sv1,
        idx_ptr,
        w_ptr,
        offs,
        limit,
        Vv,
        alpha,
        fill_term,
        HAS_VALUE,
        HAS_MAP,
        CUDA,
    )
    tl.store(out_ptr + row * V + offs, z, mask=offs < V)


@_jit
def _log_softmax_kernel(
    out_ptr,  # [B, V] fp32, contiguous
    base_ptr,
    sb0,
    sb1,
    value_ptr,
    sv0,
    sv1,
    idx_ptr,
    w_ptr,
    alpha_ptr,
    fill_ptr,
    V,
    limit,
    Vv,
    BLOCK: tl.constexpr,
    HAS_VALUE: tl.constexpr,
    HAS_MAP: tl.constexpr,
    CUDA: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base_row = base_ptr + row * sb0
    value_row = value_ptr + row * sv0
    alpha = tl.load(alpha_ptr + row)
    fill_term = tl.load(fill_ptr + row)
    m = tl.full([], float("-inf"), dtype=tl.float32)
    s = tl.full([], 0.0, dtype=tl.float32)
    bad = tl.full([], 0, dtype=tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        z = _merged(
            base_row,
            sb1,
            value_row,
            sv1,
            idx_ptr,
            w_ptr,
            offs,
            limit,
            Vv,
            alpha,
            fill_term,
            HAS_VALUE,
            HAS_MAP,
            CUDA,
        )
        bad = tl.maximum(bad, _rmax(((z != z) | (z == float("inf"))).to(tl.int32)))
        zc = tl.where(z == z, z, float("-inf"))
        m_new = tl.maximum(m, _rmax(zc))
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # keeps -inf - -inf out of the math
        s = s * tl.exp(m - ref) + _rsum(tl.exp(zc - ref))
        m = m_new
    bad = bad | (m == float("-inf")).to(tl.int32)  # no finite logit
    log_s = tl.log(s)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        z = _merged(
            base_row,
            sb1,
            value_row,
            sv1,
            idx_ptr,
            w_ptr,
            offs,
            limit,
            Vv,
            alpha,
            fill_term,
            HAS_VALUE,
            HAS_MAP,
            CUDA,
        )
        out = tl.where(bad != 0, float("nan"), (z - m) - log_s)
        tl.store(out_ptr + row * V + offs, out, mask=offs < V)


@_jit
def _sample_kernel(
    tok_ptr,  # [B] int64 out
    lp_ptr,  # [B] fp32 out
    base_ptr,
    sb0,
    sb1,
    value_ptr,
    sv0,
    sv1,
    idx_ptr,
    w_ptr,
    alpha_ptr,  # [B] fp32
    fill_ptr,  # [B] fp32
    temp_ptr,  # [B] fp32, 0 = greedy
    topk_ptr,  # [B] int64, 0 = off
    topp_ptr,  # [B] fp32, 1 = off
    lminp_ptr,  # [B] fp64 log(min_p), -inf = off
    seed_ptr,  # [B] int64
    step_ptr,  # [B] int64
    V,
    limit,
    Vv,
    BLOCK: tl.constexpr,
    SBLOCK: tl.constexpr,
    HAS_VALUE: tl.constexpr,
    HAS_MAP: tl.constexpr,
    CUDA: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base_row = base_ptr + row * sb0
    value_row = value_ptr + row * sv0
    alpha = tl.load(alpha_ptr + row)
    fill_term = tl.load(fill_ptr + row)
    temp = tl.load(temp_ptr + row)
    top_k = tl.load(topk_ptr + row)
    top_p = tl.load(topp_ptr + row)
    lmin_p = tl.load(lminp_ptr + row)
    seed = tl.load(seed_ptr + row)
    step = tl.load(step_ptr + row)
    k0 = seed.to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    c2 = step.to(tl.uint32)
    c3 = (step >> 32).to(tl.uint32)

    greedy = temp == 0.0
    temp = tl.where(greedy, 1.0, temp)
    use_k = (top_k > 0) & (top_k < V)
    use_p = top_p < 1.0
    use_m = lmin_p > float("-inf")
    fused = (~greedy) & (~use_k) & (~use_p) & (~use_m)  # plain sampling: one pass

    # Pass 1: merge; max / argmax / online sum; invalid flag; fused Gumbel-max.
    m = tl.full([], float("-inf"), dtype=tl.float32)
    s = tl.full([], 0.0, dtype=tl.float32)
    arg = tl.full([], 0, dtype=tl.int32)
    bad = tl.full([], 0, dtype=tl.int32)
    g_best = tl.full([], float("-inf"), dtype=tl.float32)
    g_tok = tl.full([], 0, dtype=tl.int32)
    g_z = tl.full([], 0.0, dtype=tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        z = _merged(
            base_row,
            sb1,
            value_row,
            sv1,
            idx_ptr,
            w_ptr,
            offs,
            limit,
            Vv,
            alpha,
            fill_term,
            HAS_VALUE,
            HAS_MAP,
            CUDA,
        )
        bad = tl.maximum(bad, _rmax(((z != z) | (z == float("inf"))).to(tl.int32)))
        zc = tl.where(z == z, z, float("-inf"))
        bm = _rmax(zc)
        bi = _rmin(tl.where(zc == bm, offs, 2147483647))
        arg = tl.where(bm > m, bi, arg)  # strict: earlier blocks win ties
        m_new = tl.maximum(m, bm)
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - ref) + _rsum(tl.exp(zc - ref))
        m = m_new
        if fused:
            g_best, g_tok, g_z = _gumbel_max_step(
                tl.math.div_rn(zc, temp),
                zc,
                offs < V,
                offs,
                start,
                k0,
                k1,
                c2,
                c3,
                g_best,
                g_tok,
                g_z,
                BLOCK,
                CUDA,
            )
    bad = bad | (m == float("-inf")).to(tl.int32)

    tok = arg
    z_tok = m
    if fused:
        tok = g_tok
        z_tok = g_z
    if (bad == 0) & (~greedy) & (~fused):
        # Filtered sampling: threshold(s), then Gumbel-max over the kept set.
        smax = tl.math.div_rn(m, temp)
        tau = tl.full([], float("-inf"), dtype=tl.float32)
        if use_k:
            tau = _threshold(
                base_row,
                sb1,
                value_row,
                sv1,
                idx_ptr,
                w_ptr,
                V,
                limit,
                Vv,
                alpha,
                fill_term,
                temp,
                tau,
                smax,
                top_k,
                top_p.to(tl.float64),
                0,
                SBLOCK,
                HAS_VALUE,
                HAS_MAP,
                CUDA,
            )
        if use_p:
            tau = _threshold(
                base_row,
                sb1,
                value_row,
                sv1,
                idx_ptr,
                w_ptr,
                V,
                limit,
                Vv,
                alpha,
                fill_term,
                temp,
                tau,
                smax,
                top_k,
                top_p.to(tl.float64),
                1,
                SBLOCK,
                HAS_VALUE,
                HAS_MAP,
                CUDA,
            )
        smax64 = smax.to(tl.float64)
        best = tl.full([], float("-inf"), dtype=tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            z = _merged(
                base_row,
                sb1,
                value_row,
                sv1,
                idx_ptr,
                w_ptr,
                offs,
                limit,
                Vv,
                alpha,
                fill_term,
                HAS_VALUE,
                HAS_MAP,
                CUDA,
            )
            sc = tl.math.div_rn(z, temp)
            keep = (offs < V) & (sc >= tau) & ((sc.to(tl.float64) - smax64) >= lmin_p)
            best, tok, z_tok = _gumbel_max_step(
                sc, z, keep, offs, start, k0, k1, c2, c3, best, tok, z_tok, BLOCK, CUDA
            )
    logprob = (z_tok - m) - tl.log(s)
    tl.store(tok_ptr + row, tl.where(bad != 0, -1, tok.to(tl.int64)))  # -1 = INVALID_TOKEN
    tl.store(lp_ptr + row, tl.where(bad != 0, float("nan"), logprob))


@_jit
def _noise_kernel(
    out_ptr,  # [B, V] fp32
    seed_ptr,
    step_ptr,
    V,
    GUMBEL: tl.constexpr,
    BLOCK: tl.constexpr,
    CUDA: tl.constexpr,
):
    """The raw stream (uniform w or Gumbel g) as the sampler sees it; for tests."""
    row = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * BLOCK
    seed = tl.load(seed_ptr + row)
    step = tl.load(step_ptr + row)
    x = _philox_block(
        start,
        seed.to(tl.uint32),
        (seed >> 32).to(tl.uint32),
        step.to(tl.uint32),
        (step >> 32).to(tl.uint32),
        BLOCK,
    )
    if GUMBEL:
        r = _gumbel(x, CUDA)
    else:
        r = x.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10
    offs = start + tl.arange(0, BLOCK)
    tl.store(out_ptr + row * V + offs, r, mask=offs < V)


# ---------------------------------------------------------------------------------------------
# Launchers (the bodies of the registered ops)
# ---------------------------------------------------------------------------------------------
def _wrap(kernel):
    return torch.library.wrap_triton(kernel)


def _errstate():
    """NumPy warnings off in the interpreter (inf - inf in masked-out lanes is expected)."""
    if _INTERPRET:
        import numpy as np

        return np.errstate(all="ignore")
    import contextlib

    return contextlib.nullcontext()


def _common(base, value, alpha, index, weight, fill):
    """Kernel arguments shared by the three ops (pointers, strides, per-row alpha and fill)."""
    has_value = value is not None
    has_map = has_value and index is not None
    val = value if has_value else base  # never read without a value
    idx = index.contiguous() if has_map else alpha
    wgt = weight.to(torch.float32).contiguous() if has_map else alpha
    alpha = alpha.to(torch.float32).contiguous()
    fill_term = alpha * torch.full_like(alpha, fill)  # fp32 alpha * fill, as the reference
    args = (
        base,
        base.stride(0),
        base.stride(1),
        val,
        val.stride(0),
        val.stride(1),
        idx,
        wgt,
        alpha,
        fill_term,
    )
    flags = {"HAS_VALUE": has_value, "HAS_MAP": has_map, "CUDA": not _INTERPRET}
    return args, flags, val.shape[1]


def _merge_logits_impl(
    base: torch.Tensor,
    value: torch.Tensor | None,
    alpha: torch.Tensor,
    index: torch.Tensor | None,
    weight: torch.Tensor | None,
    fill: float,
    vocab_limit: int,
) -> torch.Tensor:
    n, v = base.shape
    out = torch.empty((n, v), dtype=torch.float32, device=base.device)
    if n == 0:
        return out
    args, flags, vv = _common(base, value, alpha, index, weight, fill)
    block = _block(CONFIG["merge_block"], v)
    with _errstate():
        _wrap(_merge_kernel)[(n, triton.cdiv(v, block))](
            out, *args, v, vocab_limit, vv, BLOCK=block, num_warps=4, **flags
        )
    return out


def _log_softmax_impl(
    base: torch.Tensor,
    value: torch.Tensor | None,
    alpha: torch.Tensor,
    index: torch.Tensor | None,
    weight: torch.Tensor | None,
    fill: float,
    vocab_limit: int,
) -> torch.Tensor:
    n, v = base.shape
    out = torch.empty((n, v), dtype=torch.float32, device=base.device)
    if n == 0:
        return out
    args, flags, vv = _common(base, value, alpha, index, weight, fill)
    with _errstate():
        _wrap(_log_softmax_kernel)[(n,)](
            out,
            *args,
            v,
            vocab_limit,
            vv,
            BLOCK=_block(CONFIG["block"], v),
            num_warps=CONFIG["warps"],
            **flags,
        )
    return out


def _merge_sample_impl(
    base: torch.Tensor,
    value: torch.Tensor | None,
    alpha: torch.Tensor,
    index: torch.Tensor | None,
    weight: torch.Tensor | None,
    fill: float,
    vocab_limit: int,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seed: torch.Tensor,
    step: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    n, v = base.shape
    tokens = torch.empty((n,), dtype=torch.int64, device=base.device)
    logprobs = torch.empty((n,), dtype=torch.float32, device=base.device)
    if n == 0:
        return tokens, logprobs
    args, flags, vv = _common(base, value, alpha, index, weight, fill)
    log_min_p = torch.log(min_p.to(torch.float64)).contiguous()  # -inf where min_p = 0 (off)
    with _errstate():
        _wrap(_sample_kernel)[(n,)](
            tokens,
            logprobs,
            *args,
            temperature.to(torch.float32).contiguous(),
            top_k.to(torch.int64).contiguous(),
            top_p.to(torch.float32).contiguous(),
            log_min_p,
            seed.to(torch.int64).contiguous(),
            step.to(torch.int64).contiguous(),
            v,
            vocab_limit,
            vv,
            BLOCK=_block(CONFIG["block"], v),
            SBLOCK=_block(CONFIG["search_block"], v),
            num_warps=CONFIG["warps"],
            **flags,
        )
    return tokens, logprobs


def _register():
    """torch.ops.ivl_triton.{merge_logits, merged_log_softmax, merge_sample}."""
    ops = {}
    for name, fn in (
        ("merge_logits", _merge_logits_impl),
        ("merged_log_softmax", _log_softmax_impl),
        ("merge_sample", _merge_sample_impl),
    ):
        qualname = f"ivl_triton::{name}"
        if _INTERPRET:
            op = torch.library.custom_op(qualname, mutates_args=(), device_types="cpu")(fn)
        else:
            op = torch.library.triton_op(qualname, mutates_args=())(fn)
        ops[name] = op
    if _INTERPRET:

        @ops["merge_logits"].register_fake
        def _(base, value, alpha, index, weight, fill, vocab_limit):
            return base.new_empty(base.shape, dtype=torch.float32)

        @ops["merged_log_softmax"].register_fake
        def _(base, value, alpha, index, weight, fill, vocab_limit):
            return base.new_empty(base.shape, dtype=torch.float32)

        @ops["merge_sample"].register_fake
        def _(base, value, alpha, index, weight, fill, vocab_limit, *params):
            n = base.shape[0]
            return base.new_empty((n,), dtype=torch.int64), base.new_empty(
                (n,), dtype=torch.float32
            )

    return ops


_OPS = _register() if triton is not None else {}


# ---------------------------------------------------------------------------------------------
# Public wrappers: validate like the reference, then launch
# ---------------------------------------------------------------------------------------------
def _check_device(base: torch.Tensor) -> None:
    if not torch.compiler.is_compiling():  # (device queries would break a fullgraph trace)
        ok, why = available()
        if not ok:
            raise RuntimeError(f"the triton backend cannot run: {why}")
    want = "cpu" if _INTERPRET else "cuda"
    if base.device.type != want:
        raise ValueError(
            f"the triton kernels take {want} tensors here, got {base.device.type} "
            + (
                "(TRITON_INTERPRET=1 runs them on CPU tensors)"
                if _INTERPRET
                else "(move the logits to the GPU, or use the cpu / torch backend)"
            )
        )


def _merge_args(base, value, alpha, vocab_map, vocab_limit):
    """Validated (alpha [B], index, weight, vocab_limit); value checks skipped when compiling."""
    _check_device(base)
    n = base.shape[0]
    if torch.compiler.is_compiling():
        # Range checks of the map and alpha read tensor values (a host sync and a graph break):
        # under torch.compile only shapes are checked, as for tensors already on an accelerator.
        check_logits("base", base)
        vmap = map_tensors(vocab_map)
        if vmap is not None:
            vmap = (vmap[0].to(base.device), vmap[1].to(base.device))
        limit = base.shape[1] if vocab_limit is None else vocab_limit
        a = rows(alpha, n, torch.float32, base.device, "alpha")
    else:
        vmap, limit = check_merge_inputs(base, value, vocab_map, vocab_limit)
        a = alpha_rows(alpha, n, base.device)
    if base.shape[1] >= 2**31 or (value is not None and value.shape[1] >= 2**31):
        raise ValueError("vocabularies of 2^31 or more columns are not supported")
    index, weight = vmap if vmap is not None else (None, None)
    return a, index, weight, limit


def merge_logits(
    base: torch.Tensor,  # [B, V_base]
    value: torch.Tensor | None = None,  # [B, V_value]
    *,
    alpha: float | torch.Tensor = 1.0,
    vocab_map=None,
    fill: float = 0.0,
    vocab_limit: int | None = None,
) -> torch.Tensor:
    """Merged logits z_base + alpha * w * z_value[map], fp32 [B, V_base] (Triton).

    Bit-identical to ``ivl.ops.reference.merge_logits``; same parameters.

    Examples
    --------
    >>> base, value = torch.zeros(1, 3), torch.tensor([[1.0, 2.0, 3.0]])
    >>> merge_logits(base, value, alpha=0.5, vocab_limit=2)  # doctest: +SKIP
    tensor([[0.5000, 1.0000,   -inf]])
    """
    a, index, weight, limit = _merge_args(base, value, alpha, vocab_map, vocab_limit)
    return _OPS["merge_logits"](base, value, a, index, weight, float(fill), int(limit))


def merged_log_softmax(
    base: torch.Tensor,  # [B, V_base]
    value: torch.Tensor | None = None,  # [B, V_value]
    *,
    alpha: float | torch.Tensor = 1.0,
    vocab_map=None,
    fill: float = 0.0,
    vocab_limit: int | None = None,
) -> torch.Tensor:
    """log softmax of the merged logits, fp32 [B, V_base] (Triton); NaN rows where invalid.

    Matches ``ivl.ops.reference.merged_log_softmax`` to fp32 rounding of exp / log.
    """
    a, index, weight, limit = _merge_args(base, value, alpha, vocab_map, vocab_limit)
    return _OPS["merged_log_softmax"](base, value, a, index, weight, float(fill), int(limit))


def merge_sample(
    base: torch.Tensor,  # [B, V_base]
    value: torch.Tensor | None = None,  # [B, V_value]
    *,
    alpha: float | torch.Tensor = 1.0,
    vocab_map=None,
    fill: float = 0.0,
    vocab_limit: int | None = None,
    temperature: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
    min_p: float | torch.Tensor = 0.0,
    seed: int | torch.Tensor = 0,
    step: int | torch.Tensor = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge, filter and sample one token per row (Triton); see ``ivl.ops.reference.merge_sample``.

    Returns (tokens int64 [B], logprobs fp32 [B]); token -1 and logprob NaN for invalid rows.

    Examples
    --------
    >>> merge_sample(torch.tensor([[0.0, 5.0, 1.0]]), temperature=0.0)[0]  # doctest: +SKIP
    tensor([1])
    """
    a, index, weight, limit = _merge_args(base, value, alpha, vocab_map, vocab_limit)
    n, dev = base.shape[0], base.device
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, step=step)
    if torch.compiler.is_compiling():
        dtypes = dict(
            temperature=torch.float32,
            top_k=torch.int64,
            top_p=torch.float32,
            min_p=torch.float32,
            seed=torch.int64,
            step=torch.int64,
        )
        p = {k: rows(x, n, dtypes[k], dev, k) for k, x in kw.items()}
    else:
        p = sampling_rows(n, dev, **kw)
    return _OPS["merge_sample"](
        base,
        value,
        a,
        index,
        weight,
        float(fill),
        int(limit),
        p["temperature"],
        p["top_k"],
        p["top_p"],
        p["min_p"],
        p["seed"],
        p["step"],
    )


def philox_uniform(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """The random stream w, fp32 [B, vocab], from the kernels' Philox (tests compare it)."""
    return _noise(seed, step, vocab, gumbel=False)


def gumbel_noise(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """The kernels' Gumbel noise, fp32 [B, vocab] (tests compare it with the reference)."""
    return _noise(seed, step, vocab, gumbel=True)


def _noise(seed: torch.Tensor, step: torch.Tensor, vocab: int, gumbel: bool) -> torch.Tensor:
    ok, why = available()
    if not ok:
        raise RuntimeError(f"the triton backend cannot run: {why}")
    seed = seed.to(torch.int64).reshape(-1).contiguous()
    step = step.to(torch.int64).reshape(-1).expand(seed.shape[0]).contiguous()
    out = torch.empty((seed.shape[0], vocab), dtype=torch.float32, device=seed.device)
    block = _block(CONFIG["merge_block"], vocab)
    if seed.shape[0]:
        with _errstate():
            _noise_kernel[(seed.shape[0], triton.cdiv(vocab, block))](
                out, seed, step, vocab, GUMBEL=gumbel, BLOCK=block, CUDA=not _INTERPRET
            )
    return out
