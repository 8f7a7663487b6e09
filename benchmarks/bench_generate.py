"""End-to-end generation: the engine vs the forward floor vs the no-cache recompute loop.

For each (batch, prompt_len, new_tokens): tokens/s and ms per decode step of
  - engine: IVLEngine.generate_many (greedy, ignore_eos), prefill included;
  - floor: base + value decode forwards alone (HF DynamicCache, same batch), per step;
  - naive: the authors' approach (recompute both models over the prefix every step), batch 1,
    on a few tokens only (it is quadratic), reported per token.
Ratios engine/floor and naive/engine are the numbers to watch (DESIGN.md "Benchmarks").

    python benchmarks/bench_generate.py --quick          # tiny random models, seconds
    python benchmarks/bench_generate.py                  # zoo smollm2-135m-instruct (base = value)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import append_csv


def _models(quick: bool, dtype):
    from ivl.engine import IVLModel

    if quick:
        from ivl.models.tiny import tiny_model

        base, tok = tiny_model("llama", "gpt2", seed=0, initializer_range=0.5)
        value, _ = tiny_model("llama", "gpt2", seed=1, initializer_range=0.5)
        return IVLModel.from_pretrained((base, tok), (value, tok), dtype=dtype), "tiny-llama"
    name = "smollm2-135m-instruct"
    return IVLModel.from_pretrained(name, name, dtype=dtype), name


@torch.inference_mode()
def _floor_ms(model, batch: int, prompt_len: int, steps: int) -> float:
    from transformers import DynamicCache

    ids = torch.randint(100, 1000, (batch, prompt_len))
    caches = {}
    for name, m in (("base", model.base), ("value", model.value)):
        caches[name] = DynamicCache(config=m.config)
        m(input_ids=ids, cache=caches[name], use_cache=True, logits_to_keep=1)
    tok = ids[:, -1:]
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        for name, m in (("base", model.base), ("value", model.value)):
            m(input_ids=tok, cache=caches[name], use_cache=True, logits_to_keep=1)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv=None) -> int:
    from ivl.engine import IVLEngine, SamplingParams
    from ivl.engine.naive import naive_generate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny random models, small shapes")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)
    model, label = _models(args.quick, getattr(torch, args.dtype))
    shapes = (
        [(1, 8, 32), (8, 8, 32), (8, 64, 16)]
        if args.quick
        else [(1, 8, 256), (16, 8, 256), (16, 128, 128), (16, 512, 8)]
    )
    rows = []
    for batch, plen, new in shapes:
        prompts = [[100 + (i * 7 + j) % 900 for j in range(plen)] for i in range(batch)]
        params = SamplingParams(temperature=0, max_new_tokens=new, ignore_eos=True)
        engine = IVLEngine(model, max_batch=batch, max_len=plen + new + 1)
        engine.generate_many(prompts[:1], SamplingParams(max_new_tokens=2, ignore_eos=True))
        t0 = time.perf_counter()
        engine.generate_many(prompts, params)
        secs = time.perf_counter() - t0
        engine_ms = 1e3 * secs / new
        floor = _floor_ms(model, batch, plen, min(new, 16))
        naive_tokens = min(new, 4)
        t0 = time.perf_counter()
        naive_generate(
            model, prompts[0], SamplingParams(temperature=0, max_new_tokens=naive_tokens, seed=0)
        )
        naive_ms = 1e3 * (time.perf_counter() - t0) / naive_tokens  # per token, batch 1
        row = {
            "model": label,
            "dtype": args.dtype,
            "batch": batch,
            "prompt_len": plen,
            "new_tokens": new,
            "engine_tok_s": round(batch * new / secs, 1),
            "engine_ms_step": round(engine_ms, 3),
            "floor_ms_step": round(floor, 3),
            "engine_over_floor": round(engine_ms / floor, 3),
            "naive_ms_token_b1": round(naive_ms, 3),
            "engine_speedup_vs_naive": round(naive_ms / (engine_ms / batch), 2),
        }
        rows.append(row)
        print(row, flush=True)
    if not args.no_csv:
        print("appended to", append_csv("generate", rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
