"""Load causal LMs and tokenizers by zoo name or local Hugging Face folder, strictly offline.

A string is a zoo name if the zoo knows it (fetched and converted on first use), else it must be
an existing local folder. Nothing is ever fetched from a model hub (``local_files_only=True``),
and remote code is not trusted unless the caller says so.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from ivl.models import zoo

logger = logging.getLogger("ivl")

PathLike = str | os.PathLike[str]


def _resolve(name_or_path: PathLike) -> tuple[Path, zoo.ZooModel | None]:
    """(local folder, zoo entry or None). The folder of a zoo model may not exist yet."""
    if isinstance(name_or_path, str) and name_or_path in zoo.MODELS:
        entry = zoo.MODELS[name_or_path]
        return zoo.default_cache_dir() / entry.name, entry
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path, None
    what = "is not a folder" if path.exists() else "is neither a zoo model nor an existing folder"
    raise ValueError(
        f"{str(name_or_path)!r} {what}; use a zoo name ({', '.join(zoo.MODELS)}) "
        f"or the path of a local Hugging Face model folder"
    )


def _check_causal_lm(path: Path, trust_remote_code: bool) -> None:
    """Raise ValueError unless ``path`` holds a config that maps to a causal-LM class."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{path} is not a Hugging Face model folder (no config.json)")
    try:
        with open(cfg_file, encoding="utf-8") as f:
            raw = json.load(f)
    except ValueError as e:
        raise ValueError(f"{cfg_file} is not valid JSON: {e}") from None
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config = AutoConfig.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except ValueError as e:
        raise ValueError(f"cannot read the model config in {path}: {e}") from None
    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return
    if trust_remote_code and "AutoModelForCausalLM" in (raw.get("auto_map") or {}):
        return
    archs = ", ".join(raw.get("architectures") or []) or "unknown architecture"
    raise ValueError(
        f"{path} holds a {raw.get('model_type', '?')!r} model ({archs}), which is not a causal "
        f"language model; ivl needs a decoder-only LM (AutoModelForCausalLM)"
    )


def load_tokenizer(name_or_path: PathLike, *, trust_remote_code: bool = False):
    """Load a tokenizer by zoo name (only the tokenizer is extracted, not the weights) or folder.

    Examples
    --------
    >>> tok = load_tokenizer("smollm2-135m-instruct")  # doctest: +SKIP
    >>> tok("Hello").input_ids  # doctest: +SKIP
    [19556]
    """
    from transformers import AutoTokenizer

    path, entry = _resolve(name_or_path)
    if entry is not None:
        path = zoo.tokenizer_path(entry.name)
    return AutoTokenizer.from_pretrained(
        path, local_files_only=True, trust_remote_code=trust_remote_code
    )


def load_model(
    name_or_path: PathLike,
    *,
    dtype=None,
    device=None,
    trust_remote_code: bool = False,
):
    """Load a causal LM in eval mode by zoo name (fetched and converted if needed) or folder.

    Parameters
    ----------
    name_or_path : str or path
        A zoo name (see ``ivl models list``) or a local Hugging Face model folder.
    dtype : torch.dtype or str, optional
        Weights dtype; default: the dtype stored in the folder (``"auto"``).
    device : torch.device or str, optional
        Where to put the model; default: CPU.
    trust_remote_code : bool
        Allow a folder's custom modelling code to run (off by default).

    Examples
    --------
    >>> model = load_model("smollm2-135m-instruct", dtype=torch.bfloat16)  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM

    path, entry = _resolve(name_or_path)
    if entry is not None:
        path = zoo.fetch(entry.name)
    _check_causal_lm(path, trust_remote_code)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype if dtype is not None else "auto",
        local_files_only=True,
        trust_remote_code=trust_remote_code,
    )
    if device is not None:
        model = model.to(device)
    model.eval()
    logger.info(
        "loaded %s (%s, %s) in %.1fs",
        path,
        type(model).__name__,
        next(model.parameters()).dtype,
        time.perf_counter() - t0,
    )
    return model
