"""End-to-end generation: the engine against every reference, side by side in one run.

For each (batch, prompt_len, new_tokens), all greedy with ignore_eos (every row makes exactly
new_tokens tokens), same prompts:

- ``engine``: IVLEngine.generate_many (residual, paired slot caches), prefill included; on the
  CPU its base and value forwards run side by side (``parallel_forwards``, the default);
- ``engine_seq``: the same engine with ``parallel_forwards=False`` (one forward after the other);
- ``base_hf``: the base alone, HF ``generate`` with its DynamicCache (the no-value speed);
- ``floor``: base + value forwards alone with HF DynamicCaches, same batch: a batched prefill,
  then every decode step of the output timed (mean), no merge / sampling / bookkeeping;
- ``floor_narrow``: the same with ivl's narrow linears switched on (the forwards the engine
  runs on the CPU, ``ivl.engine.concurrent``), so engine / floor_narrow is the cost of the
  engine's own work (or its gain from overlapping the forwards);
- ``hf_proc``: base HF ``generate`` + ``IVLLogitsProcessor`` (value model with its own cache;
  the processor runs the value with ivl's narrow linears, HF runs the base with ``nn.Linear``);
- ``proxy``: IVLEngine in proxy-tuning mode, three cached models (expert = anti-expert = the
  value weights here: the cost is what matters);
- ``naive``: the authors' approach (no KV cache, recompute both models over the prefix every
  step), batch 1 (their release decodes one sequence at a time). It is quadratic, so only
  ``--naive-tokens`` tokens are timed at the start and at the end of the output; its per-token
  time over the whole output is estimated as the mean of the two (cost grows ~linearly with the
  prefix) and the note column says so.

Columns: ``e2e_ms_tok`` = wall time / new_tokens (one "token" = one step for the whole batch),
``tok_s`` = batch * new_tokens / wall time, ``decode_ms_step`` = per-step decode time without the
prefill (time from the first to the last generated token / (new - 1), stamped from the engine's
stream and an HF streamer; the median step for the floor), ``peak_mb`` = peak process RSS above the RSS before the method ran, sampled every 2 ms
(model weights are loaded before, so it is caches + activations; CPU only).

    python benchmarks/bench_generate.py --quick                      # tiny random models
    flock /tmp/ivl-heavy.lock python benchmarks/bench_generate.py --shapes 16x128x128
    python benchmarks/bench_generate.py --model qwen-trunc --shapes 16x128x128
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import append_csv

DEFAULT_SHAPES = "1x8x256,16x8x256,1x512x8,16x512x8,1x128x128,16x128x128"


class PeakRSS:
    """Peak resident memory (MB) above the level at entry, sampled by a thread."""

    def __init__(self, every: float = 0.002):
        import psutil

        self.proc, self.every = psutil.Process(os.getpid()), every
        self.peak_mb = 0.0

    def __enter__(self):
        self.start = self.proc.memory_info().rss
        self.peak, self.stop = self.start, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.stop.wait(self.every)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.peak_mb = (self.peak - self.start) / 2**20


def _models(which: str, dtype):
    """(IVLModel residual, IVLModel proxy, label)."""
    from ivl.engine import IVLModel

    if which == "tiny":
        from ivl.models.tiny import tiny_model

        base, tok = tiny_model("llama", "gpt2", seed=0, initializer_range=0.5)
        value, _ = tiny_model("llama", "gpt2", seed=1, initializer_range=0.5)
        label = "tiny-llama"
    elif which == "smollm2":
        from ivl.models.loading import load_model, load_tokenizer

        name = "smollm2-135m-instruct"
        base, tok = load_model(name, dtype=dtype), load_tokenizer(name)
        value = load_model(name, dtype=dtype)
        label = "smollm2-135m+smollm2-135m"
    elif which == "qwen-trunc":
        from ivl.models.loading import load_model, load_tokenizer
        from ivl.train.trainer import truncate_layers

        name = "qwen2.5-coder-0.5b-instruct"
        base, tok = load_model(name, dtype=dtype), load_tokenizer(name)
        value = truncate_layers(base, 4).to(dtype)
        label = "qwen2.5-coder-0.5b+first4layers"
    else:
        raise ValueError(f"unknown --model {which!r}")
    residual = IVLModel.from_pretrained((base, tok), (value, tok))
    proxy = IVLModel.from_pretrained(
        (base, tok), (value, tok), scheme="proxy", anti_expert=(value, tok)
    )
    return residual, proxy, label


class _Steps:
    """Wall-clock stamps of generation steps (a step = one new token for the whole batch)."""

    def __init__(self):
        self.stamps: list[float] = []

    def mark(self) -> None:
        self.stamps.append(time.perf_counter())

    def decode_s(self) -> float:
        """Seconds per step after the first token (prefill excluded)."""
        s = self.stamps
        return (s[-1] - s[0]) / (len(s) - 1) if len(s) > 1 else float("nan")


def _engine_run(model, prompts, parallel: bool | None = None):
    from ivl.engine import IVLEngine, SamplingParams

    plen = len(prompts[0])

    def run(n, steps: _Steps | None = None, ps=prompts):
        engine = IVLEngine(
            model, max_batch=len(ps), max_len=plen + n + 1, parallel_forwards=parallel
        )
        params = SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)
        made = [0] * len(ps)
        seen = 0
        for event in engine.stream(ps, params):
            if event.token is not None:
                made[event.request_id] += 1
                # every request was admitted at once: a step ends when all rows have a token
                if steps is not None and min(made) > seen:
                    seen = min(made)
                    steps.mark()
            elif event.result.error is not None:
                raise RuntimeError(event.result.error)
        assert made == [n] * len(ps), made

    return run


class _HFSteps:
    """A ``generate`` streamer that stamps each step (the first put() is the prompt)."""

    def __init__(self, steps: _Steps):
        self.steps, self.calls = steps, 0

    def put(self, value):
        self.calls += 1
        if self.calls > 1:
            self.steps.mark()

    def end(self):
        pass


def _hf_run(model, prompts, *, proc: bool):
    from ivl.engine.hf import IVLLogitsProcessor

    pad = model.tokenizer.eos_token_id or 0

    @torch.inference_mode()
    def run(n, steps: _Steps | None = None, ps=prompts):
        ids = torch.tensor(ps, dtype=torch.int64)
        mask = torch.ones_like(ids)
        kw = {}
        if proc:
            kw["logits_processor"] = [IVLLogitsProcessor(model, alpha=1.0)]
        if steps is not None:
            kw["streamer"] = _HFSteps(steps)
        out = model.base.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            pad_token_id=pad,
            **kw,
        )
        assert out.shape[1] == ids.shape[1] + n

    return run


@torch.inference_mode()
def _floor(model, prompts, steps: int, narrow: bool = False) -> tuple[float, float, float]:
    """(prefill seconds, mean decode seconds per step, peak MB) for base + value forwards, with
    ivl's narrow linears when ``narrow`` (the forwards the engine runs on the CPU).

    The mean over all ``steps`` steps of the output, like the engine's decode figure: a step
    late in a long output attends to a longer prefix and costs more than an early one."""
    from transformers import DynamicCache

    from ivl.engine.concurrent import narrow_linears

    ids = torch.tensor(prompts, dtype=torch.int64)
    pairs = (("base", model.base), ("value", model.value))
    with PeakRSS() as mem, narrow_linears() if narrow else contextlib.nullcontext():
        caches = {name: DynamicCache(config=m.config) for name, m in pairs}
        t0 = time.perf_counter()
        for name, m in pairs:
            m(input_ids=ids, cache=caches[name], use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - t0
        tok = ids[:, -1:]
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            for name, m in pairs:
                m(input_ids=tok, cache=caches[name], use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - t0)
    return prefill, statistics.mean(times), mem.peak_mb


def _naive_ms(model, prompt: list[int], k: int) -> float:
    from ivl.engine import SamplingParams
    from ivl.engine.naive import naive_generate

    params = SamplingParams(temperature=0, max_new_tokens=k, seed=0, ignore_eos=True)
    t0 = time.perf_counter()
    out = naive_generate(model, prompt, params)
    assert len(out) == k
    return 1e3 * (time.perf_counter() - t0) / k


def _shape_rows(residual, proxy, label, dtype, batch, plen, new, naive_tokens, floor_steps):
    # deterministic prompts of ordinary token ids (100..999), different per row
    prompts = [[100 + (i * 7 + j * 13) % 900 for j in range(plen)] for i in range(batch)]
    runs = {
        "engine": _engine_run(residual, prompts),
        "engine_seq": _engine_run(residual, prompts, parallel=False),
        "base_hf": _hf_run(residual, prompts, proc=False),
        "hf_proc": _hf_run(residual, prompts, proc=True),
        "proxy": _engine_run(proxy, prompts),
    }
    stats = {}
    for name, run in runs.items():
        run(2, ps=[p[:8] for p in prompts])  # warm-up (first-call overheads), cheap prefill
        steps = _Steps()
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            run(new, steps)
            secs = time.perf_counter() - t0
        assert len(steps.stamps) == new, (name, len(steps.stamps))
        stats[name] = dict(secs=secs, peak=mem.peak_mb, decode=steps.decode_s(), note="")
        print(
            f"  {name:10s} {1e3 * secs / new:9.2f} ms/tok e2e, {1e3 * steps.decode_s():9.2f} "
            f"ms/decode step, peak {mem.peak_mb:7.1f} MB",
            flush=True,
        )
    floor_steps = floor_steps or max(1, new - 1)
    for name, narrow in (("floor", False), ("floor_narrow", True)):
        prefill, step, peak = _floor(residual, prompts, floor_steps, narrow)
        stats[name] = dict(
            secs=prefill + new * step,
            peak=peak,
            decode=step,
            note=f"prefill + {new} x mean of {floor_steps} timed decode steps",
        )
        print(f"  {name:12s} {step * 1e3:9.2f} ms/step", flush=True)
    k = min(naive_tokens, new)
    first = _naive_ms(residual, prompts[0], k)
    if new > k:
        # the last k tokens of the output: start from a prompt as long as prompt + new - k
        tail = (prompts[0] * (1 + (plen + new) // plen))[: plen + new - k]
        last = _naive_ms(residual, tail, k)
    else:
        last = first
    per_tok = (first + last) / 2
    stats["naive"] = dict(
        secs=batch * new * per_tok / 1e3,  # one sequence at a time
        peak=float("nan"),
        decode=per_tok,
        note=(
            f"batch 1 sequentially; measured {k} tokens at prefix {plen} ({first:.1f} ms/tok) "
            f"and at prefix {plen + new - k} ({last:.1f} ms/tok); whole-output time estimated "
            "from their mean"
        ),
    )
    print(f"  naive {per_tok:.1f} ms/token (b1)", flush=True)
    rows = []
    eng = stats["engine"]
    for name, s in stats.items():
        rows.append(
            {
                "model": label,
                "dtype": str(dtype).replace("torch.", ""),
                "method": name,
                "batch": batch,
                "prompt_len": plen,
                "new_tokens": new,
                "tok_s": round(batch * new / s["secs"], 2),
                "e2e_ms_tok": round(1e3 * s["secs"] / new, 2),
                "decode_ms_step": round(1e3 * s["decode"], 2) if name != "naive" else "",
                "naive_ms_tok_b1": round(s["decode"], 2) if name == "naive" else "",
                "peak_mb": "" if s["peak"] != s["peak"] else round(s["peak"], 1),
                "engine_speedup": round(s["secs"] / eng["secs"], 3),
                "engine_decode_over_floor": (
                    round(eng["decode"] / s["decode"], 3) if name.startswith("floor") else ""
                ),
                "mem": "peak RSS delta, sampled 2 ms",
                "note": s["note"],
            }
        )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny random models, small shapes")
    ap.add_argument("--model", default="smollm2", choices=("smollm2", "qwen-trunc", "tiny"))
    ap.add_argument("--shapes", default=None, help=f"BxPxN,... (default {DEFAULT_SHAPES})")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--naive-tokens", type=int, default=2)
    ap.add_argument(
        "--floor-steps", type=int, default=None, help="decode steps timed (default: new - 1)"
    )
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.shapes = "tiny", args.shapes or "1x8x16,4x8x16,4x32x8"
    shapes = [
        tuple(int(x) for x in s.split("x")) for s in (args.shapes or DEFAULT_SHAPES).split(",")
    ]
    dtype = getattr(torch, args.dtype)
    residual, proxy, label = _models(args.model, dtype)
    for batch, plen, new in shapes:
        print(f"{label} batch={batch} prompt={plen} new={new}", flush=True)
        rows = _shape_rows(
            residual, proxy, label, dtype, batch, plen, new, args.naive_tokens, args.floor_steps
        )
        if not args.no_csv:  # per shape, so a long run keeps what it measured
            print("appended to", append_csv("generate", rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
