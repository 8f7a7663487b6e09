"""ivl._fs: atomic writes replace the whole file and give it the mode open() would; folders
written by libraries that make their files private get the usual modes back."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ivl._fs import atomic_write_bytes, atomic_write_text, default_modes


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


def test_default_modes_undoes_private_files_and_folders(tmp_path, default_modes_check):
    import tempfile

    folder = Path(tempfile.mkdtemp(dir=tmp_path))  # 0700
    (folder / "sub").mkdir()
    save_file({"w": torch.zeros(2)}, folder / "sub" / "w.safetensors")  # safetensors: 0600
    assert (folder / "sub" / "w.safetensors").stat().st_mode & 0o777 == 0o600
    default_modes(folder)
    default_modes_check(folder)
    os.umask(0o077)  # the user's umask decides, as for any file they write
    default_modes(folder)
    assert (folder / "sub" / "w.safetensors").stat().st_mode & 0o777 == 0o600
    assert folder.stat().st_mode & 0o777 == 0o700
