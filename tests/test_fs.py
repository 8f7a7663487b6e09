"""ivl._fs: atomic writes replace the whole file and give it the mode open() would."""

from __future__ import annotations

import os

from ivl._fs import atomic_write_bytes, atomic_write_text


def test_atomic_write_replaces_and_keeps_the_usual_mode(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "sub" / "a.txt", "first")
        assert path.read_text() == "first"
        assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0600
        atomic_write_bytes(path, b"second")
        assert path.read_bytes() == b"second"
        assert [p.name for p in path.parent.iterdir()] == ["a.txt"]  # no temp file left
        os.umask(0o077)
        assert atomic_write_text(tmp_path / "b.txt", "x").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
