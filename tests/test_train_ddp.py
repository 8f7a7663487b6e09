"""Several processes on CPU (gloo) give the same loss curve as one with the same global batch.

Three launches of the same tiny run are compared with one single-process reference:
torch.multiprocessing workers calling ``train_value``, and ``accelerate launch -m ivl train``
with each example config of examples/accelerate (DDP; FSDP, where the frozen base's decoder
layers are sharded over the processes). Same global batch, different micro-batch split:
losses differ by fp32 summation order only (rtol 1e-4).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ivl.models.tiny import save_tiny
from ivl.train.trainer import TrainConfig, train_value

REPO = Path(__file__).resolve().parents[1]
RECS = [
    {"prompt": f"Count to {i}.", "response": " ".join(map(str, range(i + 1)))} for i in range(16)
]
COMMON = dict(epochs=1, lr=3e-3, progress=False, warmup_ratio=0.0)


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(x) for x in f]
    return [r["loss"] for r in rows if "loss" in r]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(base folder, one-process losses) with batch 2 x grad_accum 2 = global batch 4."""
    root = tmp_path_factory.mktemp("ddp")
    base = str(save_tiny(root / "b", "llama", "gpt2", seed=1))
    cfg = TrainConfig(out_dir=str(root / "one"), batch_size=2, grad_accum=2, **COMMON)
    out = train_value(base, "random", RECS, cfg)
    losses = _losses(out)
    assert len(losses) == 4
    return base, losses


def _worker(rank, world, port, base, out, kw):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        train_value(base, "random", RECS, TrainConfig(out_dir=out, **kw))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_match_one(reference, tmp_path):
    import torch.multiprocessing as mp

    base, want = reference
    kw = dict(batch_size=2, grad_accum=1, **COMMON)
    mp.spawn(_worker, args=(2, _free_port(), base, str(tmp_path / "two"), kw), nprocs=2, join=True)
    got = _losses(tmp_path / "two")
    assert len(got) == len(want)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["ddp.yaml", "fsdp.yaml"])
def test_accelerate_launch_matches_one(reference, tmp_path, config):
    pytest.importorskip("accelerate")
    base, want = reference
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECS))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch"]
    cmd += ["--config_file", str(REPO / "examples" / "accelerate" / config)]
    cmd += ["--num_processes", "2", "--main_process_port", str(_free_port())]
    cmd += ["-m", "ivl", "train", "--base", base, "--value-init", "random", "--data", str(data)]
    cmd += ["--out", str(out), "--epochs", "1", "--batch-size", "2", "--grad-accum", "1"]
    cmd += ["--lr", "3e-3", "--warmup-ratio", "0", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out)  # printed once, by rank 0
    sharded = "decoder layers sharded over 2 processes" in proc.stderr
    assert sharded == (config == "fsdp.yaml"), proc.stderr[-3000:]
    got = _losses(out)
    assert len(got) == len(want)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-5)
    assert (out / "ivl.json").is_file()


@pytest.mark.slow
def test_shard_frozen_base_shards_layers(tmp_path):
    """Each of 2 processes holds half of every decoder layer; outputs equal the whole model."""
    import torch.multiprocessing as mp

    mp.spawn(_shard_worker, args=(2, _free_port()), nprocs=2, join=True)


def _shard_worker(rank, world, port):
    from ivl.models.tiny import tiny_model
    from ivl.train import schemes
    from ivl.train.trainer import shard_frozen_base

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        base, _ = tiny_model("llama", "gpt2", seed=1)
        base.eval().requires_grad_(False)
        ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = schemes.hidden_states(base, ids)
        full = base.model.layers[0].mlp.up_proj.weight.shape
        shard_frozen_base(base, torch.device("cpu"))
        w = base.model.layers[0].mlp.up_proj.weight
        assert w.to_local().shape[0] == full[0] // world
        with torch.no_grad():
            got = schemes.hidden_states(base, ids)
        torch.testing.assert_close(got, want)
    finally:
        torch.distributed.destroy_process_group()
