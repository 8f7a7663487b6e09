"""Two processes on CPU (gloo) give the same loss curve as one with the same global batch."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ivl.models.tiny import save_tiny
from ivl.train.trainer import TrainConfig, train_value

RECS = [
    {"prompt": f"Count to {i}.", "response": " ".join(map(str, range(i + 1)))} for i in range(16)
]


def _worker(rank, world, port, base, out, kw):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        train_value(base, "random", RECS, TrainConfig(out_dir=out, **kw))
    finally:
        torch.distributed.destroy_process_group()


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(x) for x in f]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    import socket

    import torch.multiprocessing as mp

    base = str(save_tiny(tmp_path / "b", "llama", "gpt2", seed=1))
    common = dict(epochs=1, lr=3e-3, progress=False, warmup_ratio=0.0)
    one = train_value(
        base,
        "random",
        RECS,
        TrainConfig(out_dir=str(tmp_path / "one"), batch_size=2, grad_accum=2, **common),
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kw = dict(batch_size=2, grad_accum=1, **common)
    mp.spawn(_worker, args=(2, port, base, str(tmp_path / "two"), kw), nprocs=2, join=True)
    a, b = _losses(one), _losses(tmp_path / "two")
    assert len(a) == len(b) == 4
    # same global batch, different micro-batch split: fp32 summation order only
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-5)
