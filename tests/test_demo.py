"""The demo's code path end to end on tiny models (the zoo-model demo is `make demo`)."""

from __future__ import annotations

import csv
import json

import pytest

pytest.importorskip("reasoning_gym")

from ivl.demo import DemoConfig, _side_by_side, run
from ivl.models.tiny import save_tiny


def test_demo_trains_transfers_and_reports(tmp_path, capsys):
    train_base = save_tiny(tmp_path / "train-base", "llama", "smollm2", seed=1)
    # A different architecture and weights, same tokenizer: the transfer needs no vocab map.
    transfer = save_tiny(tmp_path / "transfer-base", "qwen2", "smollm2", seed=2)
    cfg = DemoConfig(
        train_base=str(train_base),
        transfer_base=str(transfer),
        value_init="first-1-layers",
        train_examples=16,
        train_steps=None,  # the time-budget path: 2 timed steps, then resume up to the cap
        train_minutes=5.0,
        calib_steps=2,
        max_train_steps=6,
        batch_size=4,
        grad_accum=1,
        lr=3e-3,
        max_length=400,
        n_accuracy=2,
        n_nll=3,
        max_new_tokens=4,
        dtype="float32",
        out_dir=str(tmp_path / "demo"),
        progress=False,
    )
    res = run(cfg)
    out = capsys.readouterr().out
    assert [r["experiment"] for r in res.rows] == ["training base"] * 2 + ["transfer base"] * 2
    assert [r["alpha"] for r in res.rows] == [0.0, 1.0, 0.0, 1.0]
    train_alone, train_value = res.rows[0], res.rows[1]
    # A random tiny base is near-uniform; a few steps teach the value the demonstrations'
    # token statistics, which lowers held-out NLL (templates never seen in training).
    assert train_value["nll"] < train_alone["nll"] - 0.1
    assert all(r["n_acc"] == 2 and r["n_nll"] == 3 for r in res.rows)
    assert "[5/5] results" in out and "ACCURACY N=2" in out and "Reference answer" in out
    names = {f.name for f in res.files}
    assert {"demo.csv", "demo.md", "demo.png"} <= names
    with open(tmp_path / "demo" / "demo.csv") as f:
        got = list(csv.DictReader(f))
    assert len(got) == 4 and float(got[1]["nll"]) == pytest.approx(train_value["nll"], rel=1e-3)
    meta = json.loads((res.value_dir / "ivl.json").read_text())
    assert meta["train"]["steps"] == 6  # resumed after calibration, up to max_train_steps
    assert "6 steps fit" in out
    rows = [json.loads(x) for x in (res.value_dir / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert len(lrs) == 6 and all(lr > 0 for lr in lrs)  # no step wasted at lr 0 on resume


def test_side_by_side_wraps_both_columns():
    text = _side_by_side("a " * 40, "b", ("left", "right"), width=20)
    lines = text.splitlines()
    assert lines[0].startswith("left") and "| right" in lines[0]
    assert all(len(line.split(" | ")[0]) == 20 for line in lines[2:])
    assert len(lines) == 2 + 4  # 80 chars of "a " wrap into 4 lines of <= 20


def test_demo_command_is_registered(capsys):
    from ivl.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--transfer-base" in out and "--train-steps" in out


@pytest.mark.zoo
@pytest.mark.slow
def test_demo_on_zoo_models(tmp_path, capsys):
    from ivl.cli import main

    args = ["demo", "--train-steps", "2", "--n-accuracy", "2", "--n-nll", "2"]
    assert main([*args, "--max-new-tokens", "16", "--out", str(tmp_path), "-q"]) == 0
    out = capsys.readouterr().out
    assert "transfer base" in out and (tmp_path / "demo.png").is_file()
