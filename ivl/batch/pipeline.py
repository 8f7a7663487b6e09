"""``run_batch``: generate for a whole dataset of prompts on Ray Data.

The driver reads and validates the dataset (bad rows go to the errors file), drops the ids that
earlier runs already finished, and hands the rest to ``Dataset.map_batches`` with a fixed pool
of actors, each holding one :class:`~ivl.engine.IVLEngine` (models loaded once per actor, one
GPU each with ``gpus_per_worker=1``). Batches come back in completion order; the driver writes
each one as an atomic part file at once, so a crash loses at most the batches in flight, and
merges the parts in input order at the end.

Ray Data restarts an actor that dies (``max_restarts=-1``) and retries its batch
(``max_task_retries=-1``); a batch is written only when its results reach the driver, and ids
already written are skipped, so a retry neither loses nor duplicates rows.

Reproducibility: each row's seed comes from its id (:func:`ivl.batch.io.row_seed`), and the
engine's tokens for a request do not depend on its batch neighbours, so the output is the same
for any number of workers, batch size or order of completion, and equals
``IVLEngine.generate_many`` with the same per-row seeds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ivl._fs import atomic_write_text
from ivl.batch.io import RUN_FILE, PartStore, Row, read_rows
from ivl.engine.model import SCHEMES
from ivl.engine.params import SamplingParams

logger = logging.getLogger("ivl")

# Testing hook (fault injection): the path of a flag file holding an integer K. The first actor
# that has finished K batches claims the flag (renames it to <path>.fired) and kills its own
# process in the middle of its next batch, as a crashed worker would.
FAULT_ENV = "IVL_BATCH_FAULT_FILE"
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class BatchSummary:
    """What one :func:`run_batch` call did."""

    rows: int  # valid rows in the dataset
    skipped: int  # finished by an earlier run
    generated: int  # finished by this run
    errors: int  # rows in the errors file (bad input rows + failed generations)
    output: Path
    errors_path: Path | None  # None when there were no errors
    seconds: float  # wall time of the generation part (Ray start and model loading included)

    @property
    def rows_per_s(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0


class _Worker:
    """A Ray Data actor: one engine, models loaded once in the constructor."""

    def __init__(
        self,
        model: dict,
        engine: dict,
        params: dict,
        chat: bool,
        threads: int,
        fault_file: str | None = None,
    ):
        import torch

        from ivl.engine import IVLEngine, IVLModel

        torch.set_num_threads(max(1, threads))
        model = dict(model)
        dtype = model.pop("dtype")
        model["dtype"] = None if dtype == "auto" else getattr(torch, dtype)
        if model["device"] is None and torch.cuda.is_available():
            model["device"] = "cuda"  # Ray exposes only this actor's GPU(s)
        self.engine = IVLEngine(IVLModel.from_pretrained(**model), **engine)
        self.params = SamplingParams(**params)
        self.chat = chat
        self.fault_file = fault_file
        self.calls = 0

    def _fault(self) -> None:
        if not self.fault_file or not os.path.exists(self.fault_file):
            return
        try:
            with open(self.fault_file) as f:
                after = int(f.read().strip() or 1)
        except (OSError, ValueError):
            return
        if self.calls < after:
            return
        try:  # rename is atomic: exactly one actor wins the flag
            os.rename(self.fault_file, self.fault_file + ".fired")
        except OSError:
            return
        os._exit(1)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        prompts = [json.loads(p) for p in batch["prompt"]]
        params = [dataclasses.replace(self.params, **json.loads(o)) for o in batch["overrides"]]
        n = len(prompts)
        try:
            results = self.engine.generate_many(prompts, params, chat=self.chat)
        except Exception as e:  # e.g. out of memory: fail this batch's rows, keep the job going
            logger.exception("batch of %d rows failed", n)
            msg = f"the batch failed on its worker: {type(e).__name__}: {e}"
            text, reason, tokens, ptokens, error = [""] * n, [""] * n, [0] * n, [0] * n, [msg] * n
        else:
            text = [r.text for r in results]
            reason = [r.finish_reason or "" for r in results]
            tokens = [len(r.token_ids) for r in results]
            ptokens = [r.prompt_tokens for r in results]
            error = [r.error or "" for r in results]
        self.calls += 1
        self._fault()
        return {
            "index": np.asarray(batch["index"], dtype=np.int64),
            "text": np.array(text, dtype=object),
            "finish_reason": np.array(reason, dtype=object),
            "tokens": np.asarray(tokens, dtype=np.int64),
            "prompt_tokens": np.asarray(ptokens, dtype=np.int64),
            "error": np.array(error, dtype=object),
        }


def init_ray(address: str | None = None, num_cpus: float | None = None) -> bool:
    """Start a private local Ray (``num_cpus`` CPUs, no dashboard, quiet) or join ``address``.

    ``RAY_ADDRESS`` in the environment counts as ``address`` (Ray's convention). Without either,
    a new local Ray is started even if one already runs on the machine. Does nothing if Ray is
    already initialised in this process. Returns True when it started or connected (the caller
    then owns the session and shuts it down).
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # offline: no usage reports
    address = address or os.environ.get("RAY_ADDRESS") or None
    quiet = dict(logging_level=logging.WARNING, log_to_driver=False)
    if address:
        ray.init(address=address, **quiet)
    else:  # "local": do not attach to a cluster found in /tmp/ray
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **quiet)
    return True


def _model_spec(spec) -> str | None:
    """Model specs travel to the actors as strings; local folders as absolute paths."""
    if spec is None:
        return None
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(
            f"run_batch loads the models on each worker, so base/value/anti_expert must be zoo "
            f"names or folders, got {type(spec).__name__}"
        )
    path = Path(spec)
    return str(path.resolve()) if path.exists() else str(spec)


def _check_local_models(specs: dict) -> None:
    from ivl.models import zoo

    for what, spec in specs.items():
        if spec is not None and spec not in zoo.MODELS and not Path(spec).is_dir():
            raise FileNotFoundError(
                f"{what} model {spec!r} is neither a zoo name ({', '.join(zoo.MODELS)}) nor a "
                "folder"
            )


def _check_resources(need_cpu: float, need_gpu: float, strict: bool) -> None:
    import ray

    have = ray.cluster_resources()
    short = [
        f"{need:g} {kind} (the cluster has {have.get(kind, 0):g})"
        for kind, need in (("CPU", need_cpu), ("GPU", need_gpu))
        if need > have.get(kind, 0)
    ]
    if not short:
        return
    msg = f"the workers need {' and '.join(short)}: lower --workers or the per-worker resources"
    if strict:
        raise ValueError(msg)
    logger.warning("%s; waiting for the cluster to scale up", msg)


def run_batch(
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str],
    value: str | os.PathLike[str] | None = None,
    anti_expert: str | os.PathLike[str] | None = None,
    vocab_map: str | os.PathLike[str] | None = None,
    scheme: str = "residual",
    dtype: str = "auto",
    device: str | None = None,
    params: SamplingParams | None = None,
    seed: int = 0,
    chat: bool = False,
    workers: int = 1,
    cpus_per_worker: float = 1,
    gpus_per_worker: float = 0,
    batch_size: int = 32,
    max_batch: int = 8,
    max_len: int | None = None,
    address: str | None = None,
    errors: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> BatchSummary:
    """Generate for every row of a JSONL/Parquet dataset on Ray; results in input order.

    Parameters
    ----------
    input : path
        ``.jsonl`` or ``.parquet``; see :func:`ivl.batch.io.read_rows` for the row format.
    output : path
        Final JSONL (input order, one line per finished row: the row's columns, ``text``,
        ``finish_reason``, ``tokens``, ``prompt_tokens`` and ``seed``). Results are written as
        they come to ``<output>.parts/``; a rerun with the same settings skips finished ids.
    base, value, anti_expert, vocab_map, scheme, dtype, device
        As in :meth:`ivl.engine.IVLModel.from_pretrained`; models (and a saved vocabulary map,
        or ``"auto"``) are zoo names or folders that every worker can read. ``dtype``: ``auto``, ``float32``, ``bfloat16`` or ``float16``.
        ``device=None``: the actor's GPU if it has one, else CPU.
    params : SamplingParams
        Defaults for every row (rows may override fields). ``params.seed`` set: every row uses
        that seed; None (default): each row's seed is ``row_seed(id, seed)``.
    seed : int
        Base seed of the per-row seeds.
    workers : int
        Actors in the pool (one engine each). ``cpus_per_worker`` / ``gpus_per_worker`` are
        their Ray resources (use ``gpus_per_worker=1`` for one actor per GPU).
    batch_size : int
        Rows per ``map_batches`` call (a part file each); ``max_batch`` rows are decoded at
        once inside an actor (continuous batching).
    address : str, optional
        An existing Ray cluster (``auto`` or ``host:port``); default: start Ray on this machine
        with ``workers * cpus_per_worker`` CPUs.
    errors : path, optional
        Where bad input rows and failed generations go (JSONL); default
        ``<output stem>.errors.jsonl``. Only written when there are errors.
    overwrite : bool
        Delete earlier results of ``output`` first instead of resuming.
    """
    params = params if params is not None else SamplingParams()
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
    for name, val in (("workers", workers), ("batch_size", batch_size), ("max_batch", max_batch)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive integer, got {val!r}")
    if cpus_per_worker < 0 or gpus_per_worker < 0:
        raise ValueError("cpus_per_worker and gpus_per_worker must be >= 0")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if scheme not in SCHEMES:  # checked here: a failing actor constructor fails the whole job
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if (scheme == "proxy") != (anti_expert is not None) or (scheme == "proxy" and value is None):
        raise ValueError("proxy-tuning needs scheme='proxy' with value= and anti_expert=")
    output = Path(output)
    if output.suffix.lower() != ".jsonl":
        raise ValueError(f"--output must be a .jsonl file, got {output}")
    errors_path = (
        Path(errors) if errors is not None else output.with_name(output.stem + ".errors.jsonl")
    )
    address = address or os.environ.get("RAY_ADDRESS") or None
    specs = {"base": _model_spec(base), "value": _model_spec(value)}
    specs["anti-expert"] = _model_spec(anti_expert)
    vocab_map = _model_spec(vocab_map)  # "auto" stays a name; a map folder becomes absolute
    if address is None:
        _check_local_models(specs)

    rows, bad = read_rows(input, params, seed)
    store = PartStore(output)
    store.dir.mkdir(parents=True, exist_ok=True)
    with _Lock(store.dir / ".lock", output):
        if overwrite:
            for f in [*store.parts(), store.dir / RUN_FILE, output, errors_path]:
                f.unlink(missing_ok=True)
        settings = {
            "base": specs["base"],
            "value": specs["value"],
            "anti_expert": specs["anti-expert"],
            "vocab_map": vocab_map,
            "scheme": scheme,
            "dtype": dtype,
            "chat": chat,
            "max_len": max_len,
            "params": dataclasses.asdict(params),
            "seed": seed,
        }
        store.check_run(json.loads(json.dumps(settings)))
        done = store.finished()
        todo = [r for r in rows if r.key not in done]
        skipped = len(rows) - len(todo)
        if skipped:
            logger.info("resuming: %d of %d rows are already finished", skipped, len(rows))
        start = time.perf_counter()
        failed: list[dict] = []
        if todo:
            model = dict(
                base=specs["base"],
                value=specs["value"],
                anti_expert=specs["anti-expert"],
                vocab_map=vocab_map,
                scheme=scheme,
                dtype=dtype,
                device=device,
            )
            engine = dict(max_batch=max_batch, max_len=max_len, seed=seed)
            worker_args = dict(
                model=model,
                engine=engine,
                params=dataclasses.asdict(params),
                chat=chat,
                threads=max(1, int(cpus_per_worker)),
                fault_file=os.environ.get(FAULT_ENV),
            )
            failed = _run_ray(
                todo,
                store,
                worker_args,
                workers=workers,
                cpus_per_worker=cpus_per_worker,
                gpus_per_worker=gpus_per_worker,
                batch_size=batch_size,
                address=address,
                progress=progress,
            )
        seconds = time.perf_counter() - start
        store.merge(rows)
        all_errors = sorted(bad + failed, key=lambda e: e["index"])
        if all_errors:
            atomic_write_text(
                errors_path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in all_errors)
            )
        else:
            errors_path.unlink(missing_ok=True)  # errors of an earlier run are stale now
    return BatchSummary(
        rows=len(rows),
        skipped=skipped,
        generated=len(todo) - len(failed),
        errors=len(all_errors),
        output=output,
        errors_path=errors_path if all_errors else None,
        seconds=seconds,
    )


def _run_ray(
    todo: list[Row],
    store: PartStore,
    worker_args: dict,
    *,
    workers: int,
    cpus_per_worker: float,
    gpus_per_worker: float,
    batch_size: int,
    address: str | None,
    progress: bool,
) -> list[dict]:
    """Generate ``todo`` on a Ray Data actor pool; write parts as batches finish; return errors."""
    import ray
    import ray.data
    from ray.util.debug import log_once
    from tqdm.auto import tqdm

    owned = init_ray(address, num_cpus=max(1, math.ceil(workers * cpus_per_worker)))
    data_logger = logging.getLogger("ray.data")
    level = data_logger.level
    data_logger.setLevel(logging.WARNING)  # no execution plans / "finished in" lines
    try:
        _check_resources(workers * cpus_per_worker, workers * gpus_per_worker, strict=not address)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # ours is below
        log_once("ray_data_progress_manager_disabled")  # Ray's "bars disabled" notice: seen
        by_index = {r.index: r for r in todo}
        items = [
            {
                "index": r.index,
                "prompt": json.dumps(r.prompt, ensure_ascii=False),
                "overrides": json.dumps({**r.overrides, "seed": r.seed}),
            }
            for r in todo
        ]
        # One block per batch, at least one per worker (small jobs: every actor gets work), at
        # most 10k (a block of several batches streams them out one by one).
        blocks = min(max(math.ceil(len(items) / batch_size), min(workers, len(items))), 10_000)
        ds = ray.data.from_items(items, override_num_blocks=blocks)
        ds = ds.map_batches(
            _Worker,
            fn_constructor_kwargs=worker_args,
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=cpus_per_worker,
            num_gpus=gpus_per_worker or None,
        )
        written: set[int] = set()
        failed: list[dict] = []
        with tqdm(total=len(todo), unit="row", desc="ivl batch", disable=not progress) as bar:
            for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
                records, new = [], 0
                for i, text, reason, tokens, ptokens, error in zip(
                    out["index"].tolist(),
                    out["text"],
                    out["finish_reason"],
                    out["tokens"].tolist(),
                    out["prompt_tokens"].tolist(),
                    out["error"],
                    strict=True,
                ):
                    if i in written:  # a retried batch delivered twice
                        continue
                    written.add(i)
                    new += 1
                    row = by_index[i]
                    if error:
                        failed.append(
                            {
                                "where": row.where,
                                "index": i,
                                "id": row.id,
                                "stage": "generate",
                                "error": str(error),
                            }
                        )
                        continue
                    records.append(
                        {
                            **row.extra,
                            "text": str(text),
                            "finish_reason": str(reason),
                            "tokens": tokens,
                            "prompt_tokens": ptokens,
                            "seed": row.seed,
                        }
                    )
                store.write(records)
                bar.update(new)
        missing = len(todo) - len(written)
        if missing:
            raise RuntimeError(f"Ray returned no result for {missing} rows; rerun to finish them")
        return failed
    finally:
        data_logger.setLevel(level)
        if owned:
            ray.shutdown()


class _Lock:
    """An exclusive lock on an output, so two runs cannot write the same parts at once."""

    def __init__(self, path: Path, output: Path):
        self.path, self.output, self.fd = path, output, None

    def __enter__(self):
        import fcntl

        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise ValueError(
                f"another `ivl batch` is writing {self.output}; wait for it or use another --output"
            ) from None
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # releases the lock
