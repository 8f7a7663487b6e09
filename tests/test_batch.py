"""``ivl batch``: dataset reading, part files / resume, and the Ray Data pipeline end to end.

The Ray tests share one local Ray session (2 CPUs) per module and tiny random models saved to a
temp folder; each run still starts its own actors (torch + model import, ~10-30 s on a busy
2-core machine), so only one Ray test is in the fast suite and the others are ``slow``.
References come from the single-process engine in this process.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
from pathlib import Path

import pytest

from ivl.batch import read_rows, row_seed, run_batch
from ivl.batch.io import PartStore
from ivl.batch.pipeline import FAULT_ENV
from ivl.cli import main
from ivl.engine import IVLEngine, IVLModel, SamplingParams
from ivl.engine.params import derive_seed

# Ray Data's own DataContext touches its deprecated fields.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")

PARAMS = SamplingParams(temperature=0.9, top_k=50, max_new_tokens=6)
SAMPLING_FLAGS = ["--temperature", "0.9", "--top-k", "50", "--max-new-tokens", "6"]
PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hi",
    "Once upon a time",
    "1 2 3 4 5 6 7 8",
    "A",
    "Tell me a story about a dragon",
    "What is the capital of France?",
    "def f(x): return",
]


def _write_jsonl(path: Path, lines: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[str, str]:
    from ivl.models.tiny import save_tiny

    root = tmp_path_factory.mktemp("batch-models")
    # A larger init makes a tiny random model produce varied tokens (see tests/test_engine.py).
    base = save_tiny(root / "base", "llama", "gpt2", seed=0, initializer_range=0.5)
    value = save_tiny(root / "value", "llama", "gpt2", seed=1, initializer_range=0.5)
    return str(base), str(value)


@pytest.fixture(scope="module")
def engine(models) -> IVLEngine:
    """The single-process reference."""
    return IVLEngine(IVLModel.from_pretrained(*models), max_batch=4, max_len=64)


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray per module (2 CPUs, no dashboard); run_batch reuses it."""
    import ray

    from ivl.batch.pipeline import init_ray

    # The actors must import ivl: let them see this checkout even if it is not pip-installed.
    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH", "")
    if root not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, path) if p)
    assert init_ray(num_cpus=2)
    yield
    ray.shutdown()
    if path:
        os.environ["PYTHONPATH"] = path
    else:
        os.environ.pop("PYTHONPATH", None)


def _reference(engine: IVLEngine, prompts, seeds) -> list[str]:
    params = [dataclasses.replace(PARAMS, seed=s) for s in seeds]
    results = engine.generate_many(prompts, params)
    assert all(r.ok for r in results)
    return [r.text for r in results]


# ---- reading rows (no Ray) ---------------------------------------------------------------------
def test_read_rows_jsonl_reports_bad_rows(tmp_path):
    path = _write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"prompt": "a", "topic": "x"},  # line 1: id 0
            "",  # blank lines are skipped and not counted
            "{not json",  # line 3, index 1
            {"id": "q", "messages": [{"role": "user", "content": "hi"}], "seed": 7},
            {"id": "no-prompt"},
            {"id": "both", "prompt": "a", "messages": []},
            {"id": "bad-top-p", "prompt": "a", "top_p": 0},
            {"id": "q", "prompt": "again"},  # duplicate of line 4
            {"id": 1.5, "prompt": "a"},
            {"id": "clash", "prompt": "a", "text": "would be overwritten"},
            [1, 2],
            {"prompt": [464, 2068], "temperature": 0.0},  # token ids, index 10
        ],
    )
    with open(path, "ab") as f:
        f.write(b'{"prompt": "\xff\xfe"}\n')  # line 13: not UTF-8
        f.write(b'{"prompt": 5}\n{"messages": "hi"}\n')  # lines 14, 15: wrong prompt types
    rows, errors = read_rows(path, PARAMS, base_seed=5)
    assert [(r.id, r.where) for r in rows] == [(0, "line 1"), ("q", "line 4"), (10, "line 12")]
    assert rows[0].extra == {"id": 0, "prompt": "a", "topic": "x"}
    assert rows[0].seed == derive_seed(0, 5)
    assert rows[1].seed == 7 and rows[1].overrides == {"seed": 7}
    assert rows[1].prompt == [{"role": "user", "content": "hi"}]
    assert rows[2].prompt == [464, 2068] and rows[2].overrides == {"temperature": 0.0}
    where = {e["where"]: e for e in errors}
    assert sorted(where) == sorted(f"line {n}" for n in (3, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15))
    assert "not valid JSON" in where["line 3"]["error"]
    assert "exactly one of" in where["line 5"]["error"] and where["line 5"]["id"] == "no-prompt"
    assert "exactly one of" in where["line 6"]["error"]
    assert "top_p" in where["line 7"]["error"]
    assert "duplicate id 'q' (first at line 4)" in where["line 8"]["error"]
    assert '"id" must be' in where["line 9"]["error"]
    assert "overwritten" in where["line 10"]["error"]
    assert "JSON object" in where["line 11"]["error"]
    assert "not UTF-8" in where["line 13"]["error"]
    assert '"prompt" must be' in where["line 14"]["error"]
    assert '"messages" must be' in where["line 15"]["error"]
    assert all(e["stage"] == "input" for e in errors)


def test_read_rows_parquet_nulls_are_absent(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "id": ["a", "b", "c"],
            "prompt": ["hello", None, None],
            "messages": [None, [{"role": "user", "content": "hi"}], None],
            "temperature": [None, 0.5, None],
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")
    rows, errors = read_rows(tmp_path / "in.parquet", PARAMS)
    assert [(r.id, r.prompt, r.overrides) for r in rows] == [
        ("a", "hello", {}),
        ("b", [{"role": "user", "content": "hi"}], {"temperature": 0.5}),
    ]
    assert [(e["where"], e["id"]) for e in errors] == [("row 2", "c")]


def test_read_rows_rejects_unknown_format(tmp_path):
    (tmp_path / "in.csv").write_text("prompt\nhi\n")
    with pytest.raises(ValueError, match=r"\.jsonl .* or \.parquet"):
        read_rows(tmp_path / "in.csv", PARAMS)
    with pytest.raises(FileNotFoundError):
        read_rows(tmp_path / "missing.jsonl", PARAMS)


def test_row_seed_is_the_engine_seed_for_int_ids():
    assert [row_seed(i, 3) for i in range(4)] == [derive_seed(i, 3) for i in range(4)]
    assert row_seed("1") != row_seed(1)  # a string id is hashed, not parsed
    assert row_seed("a") == row_seed("a") != row_seed("b")
    assert row_seed("a", 1) != row_seed("a", 2)
    assert -(2**63) <= row_seed("x" * 1000) < 2**63


# ---- part files (no Ray) -----------------------------------------------------------------------
def test_part_store_merges_in_input_order_first_record_wins(tmp_path):
    path = _write_jsonl(tmp_path / "in.jsonl", [{"id": k, "prompt": k} for k in "abcd"])
    rows, _ = read_rows(path, PARAMS)
    store = PartStore(tmp_path / "out.jsonl")
    store.write([{"id": "c", "text": "C"}, {"id": "gone", "text": "G"}])
    store.write([{"id": "a", "text": "A"}, {"id": "c", "text": "C2"}])  # c delivered twice
    store.write([])  # nothing to write: no empty part file
    assert [p.name for p in store.parts()] == ["part-000001.jsonl", "part-000002.jsonl"]
    assert PartStore(tmp_path / "out.jsonl").write([{"id": "d", "text": "D"}]).name == (
        "part-000003.jsonl"  # a new store (a rerun) continues the numbering
    )
    assert store.merge(rows) == (4, 1)
    merged = _read_jsonl(tmp_path / "out.jsonl")
    # "gone" is no longer in the dataset: kept, after the others.
    expected = [("a", "A"), ("c", "C"), ("d", "D"), ("gone", "G")]
    assert [(r["id"], r["text"]) for r in merged] == expected


def test_part_store_rejects_hand_edited_part(tmp_path):
    store = PartStore(tmp_path / "out.jsonl")
    store.dir.mkdir()
    (store.dir / "part-000001.jsonl").write_text('{"id": 1}\n{"id": 2, "te\n')
    with pytest.raises(ValueError, match=r"part-000001.jsonl:2 is not valid JSON"):
        store.finished()


def test_resume_with_other_settings_is_refused(tmp_path, models):
    # Only a bad row: the run writes run.json and its errors file without starting Ray.
    inp = _write_jsonl(tmp_path / "in.jsonl", [{"id": 1}])
    out = tmp_path / "out.jsonl"
    first = run_batch(inp, out, base=models[0], params=PARAMS)
    assert (first.rows, first.errors, first.errors_path) == (0, 1, tmp_path / "out.errors.jsonl")
    assert _read_jsonl(first.errors_path)[0]["id"] == 1 and out.read_text() == ""
    other = dataclasses.replace(PARAMS, temperature=0.5)
    with pytest.raises(ValueError, match=r"other settings \(params: .*'temperature': 0.9.* -> "):
        run_batch(inp, out, base=models[0], params=other)
    with pytest.raises(ValueError, match=r"other settings \(seed: 0 -> 3\)"):
        run_batch(inp, out, base=models[0], params=PARAMS, seed=3)
    run_batch(inp, out, base=models[0], params=PARAMS, seed=3, overwrite=True)


def test_second_writer_is_refused(tmp_path, models):
    inp = _write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    out = tmp_path / "out.jsonl"
    lock = PartStore(out).dir / ".lock"
    lock.parent.mkdir()
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="another `ivl batch` is writing"):
            run_batch(inp, out, base=models[0])


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(workers=0), "workers must be a positive integer"),
        (dict(batch_size=2.5), "batch_size must be a positive integer"),
        (dict(dtype="int8"), "dtype must be one of"),
        (dict(scheme="sideways"), "unknown scheme"),
        (dict(scheme="proxy"), "proxy-tuning needs"),
        (dict(output="out.csv"), "must be a .jsonl file"),
        (dict(base="no/such/model"), "neither a zoo name"),
    ],
)
def test_bad_arguments(tmp_path, models, kwargs, msg):
    inp = _write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    kwargs = {"output": tmp_path / "out.jsonl", "base": models[0], **kwargs}
    with pytest.raises((ValueError, FileNotFoundError), match=msg):
        run_batch(inp, kwargs.pop("output"), **kwargs)


def test_cli_usage_error_exits_2(tmp_path, capsys, models):
    inp, out = str(tmp_path / "none.jsonl"), str(tmp_path / "o.jsonl")
    code = main(["batch", "--input", inp, "--output", out, "--base", models[0]])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


# ---- the Ray pipeline --------------------------------------------------------------------------
def test_two_workers_match_engine_and_report_bad_rows(tmp_path, models, engine, ray_session):
    """The fast representative: 2 actors via the CLI == the single-process engine."""
    lines = [{"id": f"r{i}", "prompt": p, "topic": i} for i, p in enumerate(PROMPTS[:5])]
    lines.insert(2, "{broken json")
    lines.append({"prompt": "no id: the row number is its id"})
    lines.append({"id": "too-long", "prompt": " ".join(["word"] * 100)})  # > max_len tokens
    inp = _write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out" / "res.jsonl"
    argv = ["batch", "--input", str(inp), "--output", str(out), "--base", models[0]]
    argv += ["--value", models[1], "--workers", "2", "--batch-size", "2", "--max-len", "64", "-q"]
    assert main(argv + SAMPLING_FLAGS) == 1  # some rows failed

    got = _read_jsonl(out)
    ids = [f"r{i}" for i in range(5)] + [6]  # the row numbers count the broken line
    assert [r["id"] for r in got] == ids
    assert [r["topic"] for r in got[:5]] == list(range(5))
    prompts = [*PROMPTS[:5], "no id: the row number is its id"]
    seeds = [row_seed(i) for i in ids]
    assert [r["seed"] for r in got] == seeds
    assert [r["text"] for r in got] == _reference(engine, prompts, seeds)
    assert all(r["tokens"] == 6 or r["finish_reason"] == "stop" for r in got)

    errors = _read_jsonl(tmp_path / "out" / "res.errors.jsonl")
    assert [(e["where"], e["stage"]) for e in errors] == [
        ("line 3", "input"),
        ("line 8", "generate"),
    ]
    assert errors[1]["id"] == "too-long" and "cache holds 64" in errors[1]["error"]


@pytest.mark.slow
def test_killed_worker_loses_and_duplicates_nothing(
    tmp_path, models, engine, ray_session, monkeypatch
):
    """An actor dies (os._exit) mid-run; Ray restarts it and retries its batch."""
    prompts = PROMPTS + [p + "!" for p in PROMPTS[:4]]  # 12 rows, 6 batches
    inp = _write_jsonl(tmp_path / "in.jsonl", [{"prompt": p} for p in prompts])
    flag = tmp_path / "die"
    flag.write_text("1")  # die in the second batch of whichever actor gets there first
    monkeypatch.setenv(FAULT_ENV, str(flag))
    out = tmp_path / "out.jsonl"
    summary = run_batch(
        inp, out, base=models[0], value=models[1], params=PARAMS, workers=2, batch_size=2,
        max_len=64, progress=False,
    )  # fmt: skip
    assert not flag.exists() and flag.with_name("die.fired").exists()  # the fault did fire
    assert (summary.generated, summary.errors, summary.skipped) == (12, 0, 0)
    got = _read_jsonl(out)
    assert [r["id"] for r in got] == list(range(12))
    # No ids in the file: the ids are the row numbers, so the default engine seeds apply.
    expected = [r.text for r in engine.generate_many(prompts, PARAMS)]
    assert [r["text"] for r in got] == expected
    written = [rec["id"] for rec in PartStore(out).records()]
    assert sorted(written) == list(range(12))  # each row written once


@pytest.mark.slow
def test_resume_skips_finished_ids(tmp_path, models, engine, ray_session):
    prompts = PROMPTS[:6]
    inp = _write_jsonl(tmp_path / "in.jsonl", [{"prompt": p} for p in prompts])
    out = tmp_path / "out.jsonl"
    # An earlier (killed) run finished rows 0 and 2; their sentinel texts prove they are not redone.
    PartStore(out).write([{"id": 0, "text": "EARLIER-0"}, {"id": 2, "text": "EARLIER-2"}])
    kwargs = dict(base=models[0], value=models[1], params=PARAMS, batch_size=2, max_len=64)
    summary = run_batch(inp, out, workers=1, progress=False, **kwargs)
    assert (summary.skipped, summary.generated, summary.errors) == (2, 4, 0)
    got = _read_jsonl(out)
    expected = [r.text for r in engine.generate_many(prompts, PARAMS)]
    assert [r["text"] for r in got] == ["EARLIER-0", expected[1], "EARLIER-2", *expected[3:]]
    parts = PartStore(out).parts()
    # Everything finished: a rerun starts no Ray job and leaves the results as they are.
    again = run_batch(inp, out, workers=1, progress=False, **kwargs)
    assert (again.skipped, again.generated) == (6, 0)
    assert PartStore(out).parts() == parts and _read_jsonl(out) == got
