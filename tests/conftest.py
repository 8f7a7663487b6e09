"""Session-wide test setup.

- Everything runs offline: nothing may be fetched from a model hub.
- IVL_CACHE defaults to the user's zoo cache (~/.cache/ivl), so converted models and extracted
  tokenizers are reused between runs; failure-injection tests use their own temp dirs instead.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Triton chooses interpreted vs compiled kernels when they are decorated (at
# `import ivl.ops.triton`): without a CUDA device, run them in its NumPy interpreter on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Set at import time, before any test module imports transformers / huggingface_hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("IVL_CACHE", str(Path.home() / ".cache" / "ivl"))


@pytest.fixture(scope="session")
def zoo_cache() -> Path:
    """The persistent zoo cache shared by the zoo tests (NOT a throwaway dir)."""
    return Path(os.environ["IVL_CACHE"])


@pytest.fixture
def default_modes_check() -> Callable[[Path], None]:
    """Sets the usual umask (022) for the test and yields a check that every file under a
    folder is 0644 and every folder 0755 (what open() and mkdir() give, so shareable)."""

    def check(root: Path) -> None:
        for p in [root, *root.rglob("*")]:
            want = 0o755 if p.is_dir() else 0o644
            assert p.stat().st_mode & 0o777 == want, f"{p}: {oct(p.stat().st_mode & 0o777)}"

    old = os.umask(0o022)
    yield check
    os.umask(old)


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A throwaway cache dir, also set as IVL_CACHE, for tests that inject failures."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("IVL_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama GGUF (~100 KB) written once per session."""
    from ivl.models.tiny import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def _write_fake_package(site: Path, dist: str, module: str, version: str, files: dict) -> None:
    pkg = site / module
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('data package: never import it')\n")
    for rel, data in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_bytes(data)
    info = site / f"{module}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")


@pytest.fixture
def fake_zoo(
    tmp_path: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., str]:
    """Register a zoo entry whose GGUF is split over two fake installed packages.

    ``fake_zoo(**overrides)`` returns the entry's name; overrides replace ZooModel fields (e.g. a
    wrong ``sha256``). The packages live in a temp folder put on sys.path, with dist-info, so the
    zoo sees them as installed at their pinned version and never calls pip.
    """
    from ivl.models import zoo

    data = tiny_gguf.read_bytes()
    half = len(data) // 2
    site = tmp_path / "site"
    packages = []
    for i, chunk in enumerate((data[:half], data[half:]), 1):
        pkg = zoo.Package(f"ivl-fake-gguf-part{i}", "1.0.0", f"ivl_fake_gguf_part{i}")
        _write_fake_package(site, pkg.dist, pkg.module, pkg.version, {f"data/part{i:02d}": chunk})
        packages.append(pkg)
    monkeypatch.syspath_prepend(str(site))

    def make(name: str = "tiny-test", **overrides) -> str:
        fields = dict(
            name=name,
            description="tiny random llama for tests",
            arch="llama",
            params=0,
            vocab=260,
            packages=tuple(packages),
            files=tuple((p.module, f"data/part{i:02d}") for i, p in enumerate(packages, 1)),
            sha256=hashlib.sha256(data).hexdigest(),
            size=len(data),
            dtype="float32",
            converted_bytes=1 << 20,
        )
        fields.update(overrides)
        monkeypatch.setitem(zoo.MODELS, name, zoo.ZooModel(**fields))
        return name

    return make
