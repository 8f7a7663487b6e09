"""merge_sample: fused merge + filter + sample, providers side by side.

    python -m benchmarks.bench_merge_sample [--quick] [--headline] [--threads N] [--gpu]

Providers (one run, same inputs):
  torch-reference   ivl.ops.reference.merge_sample, eager (the spec; sorts every row)
  torch-compile     torch.compile of the reference (compiled per shape and mode: ~30 s each here,
                    so only at the headline size B=32, V=151,936; elsewhere recorded as skipped)
  torch-idiomatic   what a user would write: base + alpha * w * value[:, map], / T, torch.topk or
                    a sort-based top-p, softmax, torch.multinomial, plus the token's logprob
  ivl-cpu           the native kernel through ivl.merge_sample (backend "cpu")
  ivl-cuda / ivl-triton   with --gpu: every provider on CUDA tensors (the reference and the
                    idiomatic sampler eager on the GPU, no torch-compile), B in {64, 1} at
                    V = 151,936 and B = 8 at V = 262,144, bf16 and fp32. GPU rows add device_ms,
                    the kernels' own time (bench_config_gpu says how it is taken), from which
                    bandwidth and speed-ups come, and fractions of both measured ceilings (read;
                    copy, counting read + write)

Modes: greedy; temperature 0.7; top-p 0.9; top-k 50; top-k 50 + top-p 0.9; temperature 0.7 with
remap ("temp+remap": a random partial map from the base vocabulary into a value vocabulary of
V/3 ids, 30% of base ids unmapped, as when the value network comes from another model family);
and temperature 0.7 with a random permutation of the full vocabulary ("temp+perm": every base
id gathers its value logit from a random place in a V-long row, the worst case for the cache).

Data: "llm": real next-token logits of Qwen2.5-Coder-0.5B (V=151,936) and Gemma-3-270m
(V=262,144) at every position of a fixed English + Python text, from the offline zoo (computed once
and cached under IVL_CACHE); V=32,000 rows are the first 32,000 ids of the Qwen rows, and value
rows are other positions' rows. Without the zoo models: "llm-synthetic", randn * 2 with 4 tokens
lifted by 10..18. "randn": randn * 3, flat rows where every token can win the Gumbel race (the
costly case for the sampler's random numbers).

Reported per row: p50 time, effective bandwidth = bytes of logits read (base + value) / time,
its fraction of the machine's read bandwidth measured in the same run
(benchmarks._common.read_bandwidth), and the speed-ups over torch-reference and torch-idiomatic.
Rows are appended to benchmarks/results/merge_sample.csv.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch

import ivl
from benchmarks._common import append_csv, copy_bandwidth, device_time, p50, read_bandwidth
from ivl.ops import _native
from ivl.ops import reference as R

MODES: dict[str, dict] = {
    "greedy": dict(temperature=0.0),
    "temperature": dict(temperature=0.7),
    "top-p": dict(temperature=1.0, top_p=0.9),
    "top-k": dict(temperature=1.0, top_k=50),
    "top-k+top-p": dict(temperature=1.0, top_k=50, top_p=0.9),
    "temp+remap": dict(temperature=0.7),
    "temp+perm": dict(temperature=0.7),
}
HEADLINE = (32, 151936)
GPU_SIZES = [
    (64, 151936),
    (1, 151936),
    (8, 262144),
]  # GPU target first: B=64, V=151,936 bf16  # first, so a run cut short still has the target configuration
SIZES = [HEADLINE] + [
    (b, v) for b in (1, 8, 32, 128) for v in (32000, 151936, 262144) if (b, v) != HEADLINE
]


REAL_MODELS = {151936: "qwen2.5-coder-0.5b-instruct", 262144: "gemma3-270m"}
TEXT = """The merge of two language models happens one token at a time. At every step the base
model scores each token of its vocabulary, a small value network adds its own opinion, and the
sampler draws the next token from the merged distribution after temperature, top-k, top-p and
min-p. Here is the loop in Python:

def generate(base, value, prompt, steps, temperature=0.7):
    tokens = list(prompt)
    for step in range(steps):
        logits = base(tokens)[-1] + value(tokens)[-1]
        probs = softmax(logits / temperature)
        tokens.append(sample(probs))
    return tokens

Sampling is cheap next to the forward passes, but it reads every logit of every row, twice when
the vocabularies differ, so on a CPU it should run at the speed of memory. The same seed and step
must give the same token on every backend, whatever else shares the batch."""


def real_rows(vocab: int) -> torch.Tensor | None:
    """Next-token logits [T, vocab] of a zoo model over TEXT (cached on disk), or None."""
    name = REAL_MODELS.get(vocab)
    if name is None:
        return None
    from ivl.models import zoo

    cache = zoo.default_cache_dir() / f"bench_logits_{name}.pt"
    if cache.is_file():
        return torch.load(cache)
    if not zoo.is_cached(name):
        return None
    from ivl.models.loading import load_model, load_tokenizer

    tok, model = load_tokenizer(name), load_model(name, dtype=torch.float32)
    ids = tok(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, :, :vocab].float().contiguous()  # [T, vocab]
    torch.save(logits, cache)
    return logits


_REAL: dict[int, torch.Tensor | None] = {}


def llm_rows(n_rows: int, cols: int, offset: int) -> torch.Tensor | None:
    """n_rows real logit rows of `cols` ids (rows of the smallest real vocabulary >= cols)."""
    vocab = min((v for v in REAL_MODELS if v >= cols), default=None)
    if vocab is None:
        return None
    if vocab not in _REAL:
        _REAL[vocab] = real_rows(vocab)
    rows = _REAL[vocab]
    if rows is None:
        return None
    pick = (torch.arange(n_rows) * 7 + offset) % rows.shape[0]  # distinct positions
    return rows[pick, :cols].clone()


def make_inputs(b: int, v: int, dtype: torch.dtype, mode: str, data: str, seed: int = 0):
    """base [b, v], value [b, vv], merge kwargs (alpha, vocab_map, fill), and the data label."""
    g = torch.Generator().manual_seed(seed)
    vv = v // 3 if mode == "temp+remap" else v
    label = data

    def rows(n, offset):
        nonlocal label
        if data == "llm":
            real = llm_rows(b, n, offset)
            if real is not None:
                return real
            label = "llm-synthetic"
        if data == "randn":
            return torch.randn(b, n, generator=g) * 3
        x = torch.randn(b, n, generator=g) * 2
        hot = torch.randint(0, n, (b, 4), generator=g)
        return x.scatter_add_(1, hot, 10 + 8 * torch.rand(b, 4, generator=g))

    base, value = rows(v, 0).to(dtype), (rows(vv, 3) * 0.5).to(dtype)
    kw: dict = dict(alpha=0.8)
    if mode == "temp+remap":
        index = torch.randint(0, vv, (v,), generator=g)
        index[torch.rand(v, generator=g) < 0.3] = -1
        kw.update(vocab_map=(index, torch.rand(v, generator=g) + 0.5), fill=-2.0)
    elif mode == "temp+perm":
        kw.update(vocab_map=(torch.randperm(v, generator=g), torch.rand(v, generator=g) + 0.5))
    return base, value, kw, label


def idiomatic(base, value, *, alpha, vocab_map=None, fill=0.0, temperature, top_k=0, top_p=1.0):
    """The straightforward PyTorch sampler a user would write (not bit-compatible with ivl)."""
    value = value.float()
    if vocab_map is not None:
        index, weight = vocab_map
        gathered = value[:, index.clamp(min=0)] * weight
        gathered = torch.where(index >= 0, gathered, torch.full_like(gathered, fill))
        z = base.float() + alpha * gathered
    else:
        z = base.float() + alpha * value
    logp = torch.log_softmax(z, dim=-1)
    if temperature == 0:
        tokens = z.argmax(dim=-1)
    else:
        s = z / temperature
        if top_k > 0:
            vals, idx = torch.topk(s, top_k, dim=-1)  # sorted descending
            if top_p < 1:
                probs = torch.softmax(vals, dim=-1)
                vals = vals.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))
            pick = torch.multinomial(torch.softmax(vals, dim=-1), 1)
            tokens = idx.gather(1, pick)[:, 0]
        elif top_p < 1:
            vals, idx = torch.sort(s, dim=-1, descending=True)
            probs = torch.softmax(vals, dim=-1)
            vals = vals.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))
            pick = torch.multinomial(torch.softmax(vals, dim=-1), 1)
            tokens = idx.gather(1, pick)[:, 0]
        else:
            tokens = torch.multinomial(torch.softmax(s, dim=-1), 1)[:, 0]
    return tokens, logp.gather(1, tokens[:, None])[:, 0]


def timed(fn: Callable[[], object], first: float) -> float:
    """p50 seconds per call; `first` is the time of a call already made. Providers that take
    seconds per call get one more call (median of the two): the reference at B=128, V=262,144
    runs for tens of seconds."""
    if first > 0.5:
        t0 = time.perf_counter()
        fn()
        return statistics.median([first, time.perf_counter() - t0])
    return p50(
        fn,
        reps=7 if first > 0.05 else 20,
        warmup=1 if first > 0.05 else 3,
        min_time=0.3,
    )


def measure(providers: dict, nbytes: int, bw: float, config: dict, cache: dict) -> list[dict]:
    """Time every CPU provider of one configuration; CSV rows with bandwidth and speed-ups.

    The reference's time does not depend on the logit values (it sorts and transforms whole
    rows whatever they hold), so it is measured once per (B, V, dtype, mode) and reused for the
    other data kind; such rows say so in their note."""
    times: dict[str, float] = {}
    notes: dict[str, str] = {}
    ref_key = (config["B"], config["V"], config["dtype"], config["mode"])
    for name, fn in providers.items():
        if isinstance(fn, str):
            notes[name] = fn
            continue
        if name == "torch-reference" and ref_key in cache:
            times[name] = cache[ref_key]
            notes[name] = "time measured on the other data kind (the reference is data-blind)"
            continue
        t0 = time.perf_counter()
        fn()
        times[name] = timed(fn, time.perf_counter() - t0)
        if name == "torch-reference":
            cache[ref_key] = times[name]
    ref_t, idi_t = times.get("torch-reference"), times.get("torch-idiomatic")
    rows = []
    for name in providers:
        row = dict(provider=name, **config)
        if name not in times:
            rows.append({**row, "note": notes[name]})
            continue
        t = times[name]
        gbps = nbytes / t / 1e9
        row.update(
            p50_ms=round(t * 1e3, 4),
            gbps=round(gbps, 2),
            frac_read_bw=round(gbps / bw, 3),
            speedup_vs_reference=round(ref_t / t, 1) if ref_t else "",
            speedup_vs_idiomatic=round(idi_t / t, 2) if idi_t else "",
            read_bw_gbps=round(bw, 1),
            note=notes.get(name, ""),
        )
        rows.append(row)
        print(
            f"B={config['B']:<4}V={config['V']:<7}{config['dtype']:<9}{config['data']:<6}"
            f"{config['mode']:<12}{name:<16}{row['p50_ms']:>11.3f} ms {gbps:>7.2f} GB/s "
            f"({gbps / bw:4.0%} of read bw)  x{row['speedup_vs_reference']} vs reference  "
            f"x{row['speedup_vs_idiomatic']} vs idiomatic",
            flush=True,
        )
    return rows


def gpu_providers() -> dict[str, Callable]:
    out: dict[str, Callable] = {}
    if not torch.cuda.is_available():
        return out
    if _native.HAS_CUDA and torch._C._dispatch_has_kernel_for_dispatch_key(
        "ivl::merge_sample", "CUDA"
    ):
        out["ivl-cuda"] = ivl.ops._native_merge_sample
    try:
        from ivl.ops import triton as ivl_triton

        if ivl_triton.available()[0]:
            out["ivl-triton"] = ivl_triton.merge_sample
    except ImportError:
        pass
    return out


def bench_config(
    b: int,
    v: int,
    dtype: torch.dtype,
    data: str,
    mode: str,
    compile_skip: str,
    bw: float,
    cache,
) -> list[dict]:
    """All CPU providers on one configuration (torch-compile only if compile_skip is empty);
    the GPU ones are bench_config_gpu's (--gpu)."""
    base, value, kw, data = make_inputs(b, v, dtype, mode, data)
    params = MODES[mode]
    seed, step = torch.arange(b), torch.full((b,), 7)
    providers: dict[str, Callable | str] = {
        "torch-reference": lambda: R.merge_sample(
            base, value, seed=seed, step=step, **kw, **params
        ),
        "torch-compile": compile_skip,
        "torch-idiomatic": lambda: idiomatic(base, value, **kw, **params),
    }
    if not compile_skip:
        torch._dynamo.reset()  # one compile per configuration, no cache limit
        compiled = torch.compile(R.merge_sample, dynamic=False)
        t0 = time.perf_counter()
        try:
            compiled(base, value, seed=seed, step=step, **kw, **params)
            providers["torch-compile"] = lambda: compiled(
                base, value, seed=seed, step=step, **kw, **params
            )
            print(f"  torch.compile: {time.perf_counter() - t0:.0f} s to compile", flush=True)
        except Exception as exc:  # record why, keep going
            providers["torch-compile"] = f"skipped: compile failed: {exc!r:.200}"
    if _native.AVAILABLE:
        providers["ivl-cpu"] = lambda: ivl.merge_sample(
            base, value, seed=seed, step=step, **kw, **params
        )
    nbytes = base.numel() * base.element_size() + value.numel() * value.element_size()
    config = dict(
        op="merge_sample", data=data, mode=mode, B=b, V=v, V_value=value.shape[1],
        dtype=str(dtype)[6:], threads=torch.get_num_threads(),
    )  # fmt: skip
    return measure(providers, nbytes, bw, config, cache)


def cuda_kw(kw: dict) -> dict:
    """make_inputs' merge kwargs with the vocabulary map's tensors on the GPU."""
    return {k: (tuple(t.cuda() for t in x) if isinstance(x, tuple) else x) for k, x in kw.items()}


def op_args(base, value, kw: dict, params: dict, seed, step) -> tuple[tuple, list]:
    """The registered ops' arguments after base and value: (alpha, index, weight, fill, limit)
    and the six per-row sampling tensors, validated once (as an engine holds them)."""
    from ivl.ops import _native_merge_args
    from ivl.ops._params import sampling_rows

    margs = _native_merge_args(base, value, kw["alpha"], kw.get("vocab_map"), kw.get("fill", 0.0),
                               None)[2:]  # fmt: skip
    full = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) | params
    p = sampling_rows(base.shape[0], base.device, seed=seed, step=step, **full)
    return margs, [p[k] for k in ("temperature", "top_k", "top_p", "min_p", "seed", "step")]


def bench_config_gpu(b: int, v: int, dtype: torch.dtype, data: str, mode: str, bws: dict):
    """Every provider on CUDA tensors, timed two ways.

    p50_ms: one call through the provider's Python entry point (input validation included),
    synchronised: what a single call costs end to end. device_ms: the kernels' own time per call
    (benchmarks._common.device_time over rotating copies of the inputs, so they are read from HBM,
    not L2): the ivl kernels through their registered ops with the arguments validated once (as
    an engine holds them across steps) and replayed from a CUDA graph; the torch samplers back
    to back (they sync with the host). Bandwidth and speed-ups come from device_ms.
    """
    base, value, kw, data = make_inputs(b, v, dtype, mode, data)
    params = MODES[mode]
    kw = cuda_kw(kw)
    base, value = base.cuda(), value.cuda()
    seed, step = torch.arange(b, device="cuda"), torch.full((b,), 7, device="cuda")
    nbytes = base.numel() * base.element_size() + value.numel() * value.element_size()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    n_sets = max(2, min(64, math.ceil(4 * l2 / nbytes)))
    sets = [(base, value)] + [(base.clone(), value.clone()) for _ in range(n_sets - 1)]
    margs, pargs = op_args(base, value, kw, params, seed, step)

    def torch_provider(fn):
        entry = lambda: fn(base, value, seed=seed, step=step, **kw, **params)  # noqa: E731
        return entry, lambda i: fn(*sets[i], seed=seed, step=step, **kw, **params), False

    providers = {
        "torch-reference": torch_provider(R.merge_sample),
        "torch-idiomatic": torch_provider(
            lambda base, value, seed, step, **rest: idiomatic(base, value, **rest)
        ),
    }
    gpu = gpu_providers()
    if "ivl-cuda" in gpu:
        providers["ivl-cuda"] = (
            lambda: gpu["ivl-cuda"](base, value, seed=seed, step=step, **kw, **params),
            lambda i: _native.merge_sample(*sets[i], *margs, *pargs),
            True,
        )
    if "ivl-triton" in gpu:
        from ivl.ops import triton as ivl_triton

        providers["ivl-triton"] = (
            lambda: gpu["ivl-triton"](base, value, seed=seed, step=step, **kw, **params),
            lambda i: ivl_triton._OPS["merge_sample"](*sets[i], *margs, *pargs),
            True,
        )
    config = dict(
        op="merge_sample", data=data, mode=mode, B=b, V=v, V_value=value.shape[1],
        dtype=str(dtype)[6:], threads=torch.get_num_threads(),
    )  # fmt: skip
    times: dict[str, tuple[float, float, str]] = {}
    for name, (entry, call, graph) in providers.items():
        if graph and not torch.equal(call(0)[0], entry()[0]):  # the timed call is the same op
            raise AssertionError(f"{name}: registered op and entry point disagree")
        e2e = p50(entry, reps=10, warmup=2, min_time=0.05, device="cuda")
        times[name] = (e2e, *device_time(call, n_sets, graph=graph, reps=5))
    ref_t, idi_t = times["torch-reference"][1], times["torch-idiomatic"][1]
    rows = []
    for name, (e2e, t, how) in times.items():
        gbps = nbytes / t / 1e9
        row = dict(
            provider=name, **config, p50_ms=round(e2e * 1e3, 4), device_ms=round(t * 1e3, 4),
            device_timing=f"{how}, {n_sets} rotating input sets", gbps=round(gbps, 1),
            frac_read_bw=round(gbps / bws["read"], 3), frac_copy_bw=round(gbps / bws["copy"], 3),
            speedup_vs_reference=round(ref_t / t, 1), speedup_vs_idiomatic=round(idi_t / t, 2),
            read_bw_gbps=round(bws["read"], 1), copy_bw_gbps=round(bws["copy"], 1),
        )  # fmt: skip
        rows.append(row)
        print(
            f"B={b:<4}V={v:<7}{config['dtype']:<9}{mode:<12}{name:<16}{t * 1e3:>9.4f} ms device "
            f"({how}) {e2e * 1e3:>8.3f} ms e2e {gbps:>8.1f} GB/s ({gbps / bws['copy']:4.0%} of "
            f"copy bw)  x{row['speedup_vs_reference']} vs reference  "
            f"x{row['speedup_vs_idiomatic']} vs idiomatic",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="B=8, V=32000, fp32, llm data only")
    parser.add_argument("--headline", action="store_true", help=f"only B, V = {HEADLINE}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--data", default=None, help="comma list of llm,randn")
    parser.add_argument("--modes", default=None, help="comma list of modes")
    parser.add_argument("--no-compile", action="store_true", help="skip torch-compile")
    parser.add_argument("--no-csv", action="store_true", help="print only")
    parser.add_argument("--gpu", action="store_true", help="CUDA tensors: ivl-cuda, ivl-triton")
    args = parser.parse_args()
    device = "cuda" if args.gpu else "cpu"
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA device (torch.cuda.is_available() is False)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu:
        sizes, dtypes, datas = GPU_SIZES, [torch.bfloat16, torch.float32], ["llm"]
    elif args.quick:
        sizes, dtypes, datas = [(8, 32000)], [torch.float32], ["llm"]
    else:
        sizes = [HEADLINE] if args.headline else SIZES
        dtypes, datas = [torch.float32, torch.bfloat16], ["llm", "randn"]
    if args.data:
        datas = args.data.split(",")
    modes = args.modes.split(",") if args.modes else list(MODES)
    if not _native.AVAILABLE:
        print(f"native extension unavailable ({_native.REASON}): no ivl-cpu rows")

    bw = statistics.median([read_bandwidth(device=device) for _ in range(3)])
    print(f"{device} read bandwidth: {bw:.1f} GB/s, torch threads: {torch.get_num_threads()}")
    if args.gpu:  # the GPU rows report both ceilings
        bw = {"read": bw, "copy": copy_bandwidth()}
        print(f"cuda copy bandwidth (read + write): {bw['copy']:.1f} GB/s")
    rows: list[dict] = []
    path = None
    ref_cache: dict[tuple, float] = {}
    for b, v in sizes:
        for dtype in dtypes:
            for data in datas:
                for mode in modes:
                    skip = "skipped: --no-compile" if args.no_compile else ""
                    if (b, v) != HEADLINE and not skip and not args.gpu:
                        skip = (
                            "skipped: compiling the reference takes ~30 s per shape and mode here "
                            "(graph breaks on its data-dependent validation) and runs no faster "
                            f"than eager; measured at B, V = {HEADLINE} only"
                        )
                    out = (
                        bench_config_gpu(b, v, dtype, data, mode, bw)
                        if args.gpu
                        else bench_config(b, v, dtype, data, mode, skip, bw, ref_cache)
                    )
                    if not args.no_csv:  # appended as they come: a long run keeps what it did
                        path = append_csv("merge_sample", out)
                    rows += out
    if not args.no_csv:
        print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
