"""benchmarks/_common.append_csv keeps columns aligned when rows of different kinds share a file."""

import csv

import benchmarks._common as common


def test_append_csv_matches_columns_by_name(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "provenance", lambda: {"commit": "abc"})
    common.append_csv("t", [{"what": "map", "build_s": 1.5}])
    common.append_csv("t", [{"what": "map", "build_s": 2.5}])  # same columns: appended
    common.append_csv("t", [{"build_s": 3.5, "what": "gen", "ms": 7}])  # reordered + a new column
    with (tmp_path / "t.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["what"] for r in rows] == ["map", "map", "gen"]
    assert [r["build_s"] for r in rows] == ["1.5", "2.5", "3.5"]
    assert [r["ms"] for r in rows] == ["", "", "7"]
    assert {r["commit"] for r in rows} == {"abc"}
