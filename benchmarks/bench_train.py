"""Training step: ivl's chunked merged loss vs the naive loss and vs the model-only floor.

For each (model pair, sequence length) one training step of the value network against the
frozen base (batch 1, 3/4 of the tokens supervised) is run three ways:

- ``chunked``: base hidden states (no grad) + value hidden states, then
  :func:`ivl.train.loss.merged_loss` (both LM heads applied chunk by chunk), backward;
- ``naive`` (reference a): both full ``[tokens, V]`` logit tensors through the LM heads, then
  :func:`ivl.train.loss.naive_merged_loss`, backward;
- ``floor`` (reference b): the base forward (with its LM head, no grad) and the value forward +
  backward (with its LM head; the logits' gradient is a fixed tensor, so no loss is computed)
  timed alone and summed: what the two models cost without any merged loss.

Reported: tokens/s of each, ``throughput_vs_floor = t_floor / t_chunked`` (target >= 0.85),
and peak memory. Memory is the peak of bytes allocated through torch's CPU allocator above what
was allocated before the measured region, read from the profiler's allocation events
(``torch.profiler.profile(profile_memory=True)``: each event carries the allocator's running
total, so temporaries inside a single op count too). It is measured in separate, untimed runs:

- ``loss_mem_mb_*``: the loss path alone, from precomputed hidden states to the gradients of
  the value hidden states and LM head (the LM head's weight gradient, ``V x D`` fp32, is in
  both); target at 1024 tokens and V = 151,936: chunked <= 1/4 of naive;
- ``step_mem_mb_*``: a whole step (floor: the larger of its two parts).

Not counted: oneDNN/MKL scratch memory that bypasses torch's allocator, and tensors that existed
before the region (model weights, inputs). Models are fp32: on CPUs without AVX512-BF16/AMX
(this machine: AVX2) bf16 matmuls are several times slower than fp32.

    python -m benchmarks.bench_train                             # tiny models (quick check)
    python -m benchmarks.bench_train --pairs smol --lengths 256  # SmolLM2-135M + its copy
    python -m benchmarks.bench_train --pairs qwen --lengths 1024 --what memory

Rows go to benchmarks/results/train.csv (one per pair, length and ``--what``, appended as
soon as measured).
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks._common import append_csv, p50
from ivl.train import schemes
from ivl.train.loss import merged_loss, naive_merged_loss

PAIRS = {
    "tiny": "tiny-qwen2 + first-1-layers",
    "smol": "smollm2-135m-instruct + copy of it",
    "qwen": "qwen2.5-coder-0.5b-instruct + first-4-layers",
}


def load_pair(key: str):
    from ivl.train.trainer import truncate_layers

    if key == "tiny":
        from ivl.models.tiny import tiny_model

        base, _ = tiny_model("qwen2", "qwen2", seed=1)
        value = truncate_layers(base, 1)
    else:
        from ivl.models.loading import load_model

        name = "smollm2-135m-instruct" if key == "smol" else "qwen2.5-coder-0.5b-instruct"
        base = load_model(name, dtype=torch.float32)
        value = load_model(name, dtype=torch.float32) if key == "smol" else truncate_layers(base, 4)
    base.eval().requires_grad_(False)
    value.train().requires_grad_(True)
    return base, value


def peak_alloc_mb(fn) -> float:
    """Peak MiB allocated by torch's CPU allocator during ``fn()`` above the level at its start."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    # (torch warns once about frees of blocks allocated before profiling: they are not counted)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    stack, peak = list(prof.profiler.kineto_results.experimental_event_tree()), 0
    while stack:
        ev = stack.pop()
        stack.extend(ev.children)
        if ev.tag == _EventType.Allocation and ev.extra_fields.device.type == "cpu":
            peak = max(peak, ev.extra_fields.total_allocated)
    return peak / 2**20


def loss_and_backward(base, value, hb, hv, labels, kind):
    """The loss path: merged loss from hidden states, then backward."""
    wb, wv = base.get_output_embeddings().weight, value.get_output_embeddings().weight
    if kind == "chunked":
        loss, _ = merged_loss(hb, wb, hv, wv, labels)
    else:
        with torch.no_grad():
            zb = base.get_output_embeddings()(hb)
        zv = value.get_output_embeddings()(hv)
        loss = naive_merged_loss(zb, zv, labels)
    loss.backward()


def step(base, value, ids, labels, kind):
    """One training step (forwards, loss, backward) with the chunked or the naive loss."""
    with torch.no_grad():
        hb = schemes.hidden_states(base, ids)
    hv = schemes.hidden_states(value, ids)
    loss_and_backward(base, value, hb, hv, labels, kind)
    value.zero_grad(set_to_none=True)


def floor_base(base, ids):
    with torch.no_grad():
        base(input_ids=ids, use_cache=False).logits  # noqa: B018  (forward incl. LM head)


def floor_value(value, ids, grad_logits):
    value(input_ids=ids, use_cache=False).logits.backward(grad_logits)
    value.zero_grad(set_to_none=True)


def bench(key: str, n: int, what: str, reps: int, warmup: int) -> dict:
    base, value = load_pair(key)
    vocab = value.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, n), generator=g)
    labels = ids.clone()
    labels[:, : n // 4] = -100  # a prompt: first quarter not supervised
    row: dict = {"pair": PAIRS[key], "seq_len": n, "vocab": vocab, "what": what}
    if what == "time":
        grad_logits = torch.full((1, n, vocab), 1e-6)
        t = {
            k: p50(lambda k=k: step(base, value, ids, labels, k), reps=reps, warmup=warmup)
            for k in ("chunked", "naive")
        }
        t_base = p50(lambda: floor_base(base, ids), reps=reps, warmup=warmup)
        t_value = p50(lambda: floor_value(value, ids, grad_logits), reps=reps, warmup=warmup)
        t["floor"] = t_base + t_value
        row.update({f"tok_s_{k}": n / t[k] for k in ("chunked", "naive", "floor")})
        row["floor_base_s"], row["floor_value_s"] = t_base, t_value
        row["throughput_vs_floor"] = t["floor"] / t["chunked"]
        row["throughput_vs_naive"] = t["naive"] / t["chunked"]
    else:
        with torch.no_grad():
            hb = schemes.hidden_states(base, ids)
        hv = schemes.hidden_states(value, ids).detach().requires_grad_(True)
        for k in ("chunked", "naive"):
            value.zero_grad(set_to_none=True)
            row[f"loss_mem_mb_{k}"] = peak_alloc_mb(
                lambda k=k: loss_and_backward(base, value, hb, hv, labels, k)
            )
            hv.grad = None
        value.zero_grad(set_to_none=True)
        del hb, hv
        if what == "memory+step":
            for k in ("chunked", "naive"):
                row[f"step_mem_mb_{k}"] = peak_alloc_mb(
                    lambda k=k: step(base, value, ids, labels, k)
                )
            grad_logits = torch.full((1, n, vocab), 1e-6)
            row["step_mem_mb_floor"] = max(
                peak_alloc_mb(lambda: floor_base(base, ids)),
                peak_alloc_mb(lambda: floor_value(value, ids, grad_logits)),
            )
        row["loss_mem_ratio"] = row["loss_mem_mb_chunked"] / row["loss_mem_mb_naive"]
    return row


# Every row has every column (empty where not measured), so time and memory rows share one header.
COLUMNS = [
    "pair", "seq_len", "vocab", "what", "tok_s_chunked", "tok_s_naive", "tok_s_floor",
    "floor_base_s", "floor_value_s", "throughput_vs_floor", "throughput_vs_naive",
    "loss_mem_mb_chunked", "loss_mem_mb_naive", "loss_mem_ratio", "step_mem_mb_chunked",
    "step_mem_mb_naive", "step_mem_mb_floor",
]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", default="tiny", help=f"comma-separated: {', '.join(PAIRS)}")
    ap.add_argument("--lengths", default="256")
    ap.add_argument(
        "--what",
        default="time,memory+step",
        help="comma-separated: time, memory (loss path) and/or memory+step (also whole steps)",
    )
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    for key in args.pairs.split(","):
        if key not in PAIRS:
            raise SystemExit(f"unknown pair {key!r}; choose from {', '.join(PAIRS)}")
        for n in map(int, args.lengths.split(",")):
            for what in args.what.split(","):
                if what not in ("time", "memory", "memory+step"):
                    raise SystemExit(f"unknown --what {what!r}")
                row = bench(key, n, what, args.reps, args.warmup)
                print(json.dumps(row), flush=True)
                # one row at a time: a long run cut short keeps what it measured
                full = {c: row.get(c, "") for c in COLUMNS}
                print(append_csv("train", [full]), flush=True)


if __name__ == "__main__":
    main()
