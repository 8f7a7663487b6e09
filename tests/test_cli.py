"""The ``ivl`` command: ``models list``, ``models fetch``, exit codes and one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import ivl
from ivl.cli import main
from ivl.models import zoo

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path]), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "ivl", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
        check=False,
    )


def test_version_via_python_m():
    proc = _run("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"ivl {ivl.__version__}"


def test_models_list_table(tmp_cache):
    proc = _run("models", "list", "--cache-dir", str(tmp_cache))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["NAME", "ARCH", "PARAMS", "VOCAB", "DTYPE", "DOWNLOAD", "CACHED"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert list(rows) == list(zoo.MODELS)
    assert rows["gemma3-270m"][1:4] == ["gemma3", "268.1M", "262,144"]
    assert rows["qwen2.5-coder-1.5b-instruct"][4] == "bfloat16"
    assert all(r[-1] == "no" for r in rows.values())


def test_models_list_verbose_and_cached(fake_zoo, tmp_cache, capsys):
    name = fake_zoo()
    zoo.fetch(name, progress=False)
    assert main(["models", "list", "-v"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith(name))
    assert row.split()[-1] == "yes"
    assert "tiny random llama for tests" in out


def test_models_fetch_prints_the_folder(fake_zoo, tmp_path, capsys):
    name = fake_zoo()
    cache = tmp_path / "elsewhere"
    assert main(["models", "fetch", name, "--cache-dir", str(cache), "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(cache / name)
    assert zoo.is_cached(name, cache_dir=cache)


def test_unknown_model_is_a_one_line_error():
    proc = _run("models", "fetch", "gpt-5")
    assert proc.returncode == 2
    assert proc.stdout == ""
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("ivl: error: unknown zoo model 'gpt-5'")
    assert all(name in err for name in zoo.MODELS)


def test_user_errors_exit_2_in_process(fake_zoo, tmp_cache, capsys):
    name = fake_zoo(converted_bytes=10**18)
    assert main(["models", "fetch", name]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("ivl: error: not enough disk space")

    name = fake_zoo("tiny-bad", sha256="0" * 64)
    assert main(["models", "fetch", name, "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "SHA-256" in err and "--force-reinstall" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "argv", [[], ["models"], ["models", "fetch"], ["nope"], ["models", "list", "--bogus"]]
)
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: ivl" in capsys.readouterr().err


def test_help_lists_models_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "models" in capsys.readouterr().out
