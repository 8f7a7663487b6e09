"""Dataset rows in, result files out: everything of ``ivl batch`` that does not need Ray.

- :func:`read_rows` reads a JSONL or Parquet dataset of prompts and validates every row; a bad
  row becomes an error record (it never stops the job).
- :func:`row_seed` gives a row its sampling seed from its id, so a row's output does not depend
  on its position in the file, on the worker that runs it, or on its batch neighbours.
- :class:`PartStore` owns ``<output>.parts/``: append-only JSONL part files, each written
  atomically, the ids already finished (for resuming) and the final merge in input order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ivl._fs import atomic_write_text
from ivl.engine.cli import _OVERRIDES
from ivl.engine.params import SamplingParams, derive_seed

PROMPT_KEYS = ("prompt", "messages")
# Keys the pipeline adds to each output record (an input row may not use them; "seed" is also
# an override, and the output holds the seed that was used).
RESULT_KEYS = ("text", "finish_reason", "tokens", "prompt_tokens")
RUN_FILE = "run.json"


def id_key(row_id: int | str) -> str:
    """The canonical key of a row id (JSON, so the int 1 and the string "1" differ)."""
    return json.dumps(row_id, ensure_ascii=False)


def row_seed(row_id: int | str, base_seed: int = 0) -> int:
    """The sampling seed of the row with id ``row_id`` (a signed 64-bit int).

    An int id ``i`` gets ``derive_seed(i, base_seed)``: exactly the seed ``IVLEngine(seed=
    base_seed).generate_many`` gives prompt ``i``, so a file without ids (ids = row numbers)
    reproduces the single-process engine. A string id is first hashed (BLAKE2b, 64 bits).

    Examples
    --------
    >>> from ivl.engine.params import derive_seed
    >>> row_seed(3) == derive_seed(3, 0)
    True
    >>> row_seed("q-17") == row_seed("q-17") != row_seed("q-18")
    True
    """
    if isinstance(row_id, str):
        digest = hashlib.blake2b(row_id.encode("utf-8"), digest_size=8).digest()
        row_id = int.from_bytes(digest, "little")
    return derive_seed(row_id, base_seed)


@dataclass
class Row:
    """One valid input row: its position, id, prompt, sampling overrides and other columns."""

    index: int  # 0-based position among the dataset's rows (blank JSONL lines do not count)
    where: str  # "line N" (JSONL, 1-based) or "row N" (Parquet), for error messages
    id: int | str
    prompt: Any  # string, token ids or chat messages
    overrides: dict  # per-row SamplingParams fields (seed included when the row sets one)
    seed: int
    extra: dict  # id, prompt/messages and every other non-override column: the output's start

    @property
    def key(self) -> str:
        return id_key(self.id)


def _records(path: Path) -> Iterator[tuple[int, str, Any, str | None]]:
    """(index, where, record or None, parse error) for each row of a JSONL or Parquet file."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        index = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for rec in batch.to_pylist():
                yield index, f"row {index}", rec, None
                index += 1
        return
    if path.suffix.lower() not in (".jsonl", ".json", ".ndjson"):
        raise ValueError(
            f"{path}: unknown dataset format {path.suffix!r}; use .jsonl (one JSON object per "
            "line) or .parquet"
        )
    index = 0
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is one bad row, not a crash
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec, err = json.loads(line.decode("utf-8")), None
            except UnicodeDecodeError as e:
                rec, err = None, f"not UTF-8 text: {e}"
            except ValueError as e:
                rec, err = None, f"not valid JSON: {e}"
            yield index, f"line {lineno}", rec, err
            index += 1


def _check_id(rec: dict, index: int) -> int | str:
    row_id = rec.get("id")
    if row_id is None:
        return index
    if isinstance(row_id, bool) or not isinstance(row_id, (int, str)):
        raise ValueError(f'"id" must be a string or an integer, got {row_id!r:.60}')
    return row_id


def _check_prompt(rec: dict) -> None:
    if "prompt" in rec:
        p = rec["prompt"]
        ids = isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
        if not (isinstance(p, str) or ids):
            raise ValueError(f'"prompt" must be a string or a list of token ids, got {p!r:.60}')
    elif not (
        isinstance(rec["messages"], list) and all(isinstance(m, dict) for m in rec["messages"])
    ):
        raise ValueError('"messages" must be a list of {"role": ..., "content": ...} objects')


def read_rows(
    path: str | os.PathLike[str], params: SamplingParams, base_seed: int = 0
) -> tuple[list[Row], list[dict]]:
    """Read and validate a dataset of prompts; return ``(rows, errors)``.

    Each record holds exactly one of ``prompt`` (text or token ids) or ``messages`` (chat),
    optionally an ``id`` (string or int; default: the row's 0-based position) and per-row
    overrides of ``params`` (``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``,
    ``min_p``, ``alpha``, ``seed``, ``stop``); other columns are kept for the output. Nulls
    (Parquet) count as absent. A row that breaks a rule, or repeats an earlier row's id, becomes
    an error record ``{"where", "index", "id", "stage": "input", "error"}``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {path} does not exist")
    rows: list[Row] = []
    errors: list[dict] = []
    seen: dict[str, str] = {}
    for index, where, rec, err in _records(path):
        row_id = None
        try:
            if err is not None:
                raise ValueError(err)
            if not isinstance(rec, dict):
                raise ValueError(f"a row must be a JSON object, got {type(rec).__name__}")
            rec = {k: v for k, v in rec.items() if v is not None}
            row_id = _check_id(rec, index)
            if sum(k in rec for k in PROMPT_KEYS) != 1:
                raise ValueError('a row needs exactly one of "prompt" or "messages"')
            _check_prompt(rec)
            clash = [k for k in RESULT_KEYS if k in rec]
            if clash:
                raise ValueError(f"column(s) {clash} would be overwritten by the results; rename")
            overrides = {k: rec[k] for k in _OVERRIDES if k in rec}
            dataclasses.replace(params, **overrides)  # validates; raises TypeError/ValueError
            key = id_key(row_id)
            if key in seen:
                raise ValueError(f"duplicate id {row_id!r} (first at {seen[key]})")
            seen[key] = where
        except (TypeError, ValueError) as e:
            errors.append(
                {"where": where, "index": index, "id": row_id, "stage": "input", "error": str(e)}
            )
            continue
        if "seed" in overrides:
            seed = overrides["seed"]
        elif params.seed is not None:
            seed = params.seed
        else:
            seed = row_seed(row_id, base_seed)
        prompt = rec["prompt"] if "prompt" in rec else rec["messages"]
        extra = {"id": row_id, **{k: v for k, v in rec.items() if k not in _OVERRIDES}}
        rows.append(Row(index, where, row_id, prompt, overrides, seed, extra))
    return rows, errors


class PartStore:
    """The part files of one output: ``<output>.parts/part-NNNNNN.jsonl`` plus ``run.json``.

    Parts are only ever added, each in one atomic write, so a crash (of a worker, the driver or
    the machine) never leaves a torn file; every record carries its row ``id``, and readers keep
    the first record of an id, so a batch delivered twice cannot duplicate rows.
    """

    def __init__(self, output: Path):
        self.output = output
        self.dir = output.with_name(output.name + ".parts")
        self._next = 0

    def parts(self) -> list[Path]:
        return sorted(self.dir.glob("part-*.jsonl")) if self.dir.is_dir() else []

    def records(self) -> Iterator[dict]:
        for part in self.parts():
            with open(part, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    try:
                        rec = json.loads(line)
                    except ValueError as e:
                        raise ValueError(
                            f"{part}:{n} is not valid JSON ({e}); part files are written "
                            "atomically, so it was changed by hand: delete it to redo its rows"
                        ) from None
                    yield rec

    def finished(self) -> dict[str, dict]:
        """Id key -> the first record written for it."""
        done: dict[str, dict] = {}
        for rec in self.records():
            done.setdefault(id_key(rec["id"]), rec)
        return done

    def check_run(self, settings: dict) -> None:
        """Write ``run.json`` on a fresh start; on a resume, refuse different settings."""
        path = self.dir / RUN_FILE
        if path.is_file():
            old = json.loads(path.read_text(encoding="utf-8"))
            diff = sorted(k for k in {*old, *settings} if old.get(k) != settings.get(k))
            if diff:
                changes = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff)
                raise ValueError(
                    f"{self.dir} holds results made with other settings ({changes}); resuming "
                    "would mix them. Use another --output, or --overwrite to start over"
                )
            return
        atomic_write_text(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")

    def write(self, records: Iterable[dict]) -> Path | None:
        """Add one part file holding ``records`` (atomically); returns its path."""
        lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
        if not lines:
            return None
        if self._next == 0:
            existing = self.parts()
            self._next = int(existing[-1].stem.split("-")[1]) + 1 if existing else 1
        path = self.dir / f"part-{self._next:06d}.jsonl"
        self._next += 1
        atomic_write_text(path, "".join(lines))
        return path

    def merge(self, rows: list[Row]) -> tuple[int, int]:
        """Write the output file: one record per finished id, in input order.

        Records of ids that are no longer in the dataset (it changed since they were made) go
        after them, in the order they were written. Returns ``(written, not in the dataset)``.
        """
        done = self.finished()
        lines = []
        for row in rows:
            rec = done.pop(row.key, None)
            if rec is not None:
                lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
        stale = [json.dumps(r, ensure_ascii=False) + "\n" for r in done.values()]
        atomic_write_text(self.output, "".join(lines + stale))
        return len(lines) + len(stale), len(stale)
