"""The fine-tuned-target baseline: train the target base itself on the value's data and budget.

``finetune(base, data, config, method="auto"|"full"|"lora") -> Path`` reads the same
:class:`~ivl.train.TrainConfig` as :func:`ivl.train.train_value` and reuses its data
resolution, schedule (warmup + cosine) and per-epoch data order, so with one config both see
exactly the same examples in the same order: the same data and token budget. The loss is the
plain next-token cross-entropy on assistant tokens, normalised by the supervised tokens of the
whole global batch (as the value trainer does).

- ``full``: every weight trains (fp32 master weights; AdamW needs ~16 bytes per parameter).
- ``lora``: LoRA adapters on every linear layer (``peft``), merged into the weights at the end.
- ``auto``: ``full`` when 16 bytes x parameters fits in half the machine's RAM, else ``lora``.

The result is a plain Hugging Face folder (weights + tokenizer + ``ivl_finetune.json``), usable
as a base anywhere (``IVLModel.from_pretrained(folder)``, ``ivl eval --base folder``). Written
atomically: a temporary sibling folder renamed into place when complete.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch

from ivl._fs import default_modes

logger = logging.getLogger("ivl")

METHODS = ("auto", "full", "lora")
FT_JSON = "ivl_finetune.json"
_BYTES_PER_PARAM_FULL = 16  # fp32 weights + grads + AdamW's two moments


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def choose_method(n_params: int, method: str = "auto", *, ram_bytes: int | None = None) -> str:
    """``full`` or ``lora`` for a model of ``n_params`` parameters (see module docstring)."""
    if method not in METHODS:
        raise ValueError(
            f"unknown fine-tuning method {method!r}; choose one of {', '.join(METHODS)}"
        )
    if method != "auto":
        return method
    ram = ram_bytes if ram_bytes is not None else _ram_bytes()
    return "full" if _BYTES_PER_PARAM_FULL * n_params <= ram // 2 else "lora"


def _lora(model, r: int, alpha: int, dropout: float, target_modules):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ValueError("LoRA fine-tuning needs peft: pip install 'ivl[eval]'") from None
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules or "all-linear",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


def finetune(
    base,
    data_source,
    config=None,
    *,
    method: str = "auto",
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    target_modules=None,
    tokenizer=None,
) -> Path:
    """Fine-tune ``base`` on ``data_source`` with ``config`` (a TrainConfig); return the folder.

    ``config.out_dir`` receives the model. ``config.lam`` / ``scheme`` are ignored (no value
    network). Example::

        cfg = TrainConfig(out_dir="runs/ft-1.5b", max_steps=200, extra={"train_examples": 2000})
        finetune("qwen2.5-coder-1.5b-instruct", "gsm-symbolic", cfg, method="lora")
    """
    from tqdm.auto import tqdm

    from ivl.models.loading import load_model, load_tokenizer
    from ivl.train import TrainConfig, data
    from ivl.train.loss import shift_targets
    from ivl.train.trainer import _dtype, _order, _resolve_data, _schedule, check_writable

    cfg = dataclasses.replace(config) if config is not None else TrainConfig()
    cfg.validate()
    out = Path(cfg.out_dir).expanduser()
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise ValueError(f"{out} is not empty; pass overwrite=True (--overwrite) or another folder")
    check_writable(out.parent)
    if tokenizer is None:
        if isinstance(base, torch.nn.Module):
            raise ValueError("pass tokenizer= when base is a loaded model")
        tokenizer = load_tokenizer(base)
    train_exs, _, desc = _resolve_data(data_source, tokenizer, cfg)

    model = base if isinstance(base, torch.nn.Module) else load_model(base, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    chosen = choose_method(n_params, method)
    logger.info("fine-tuning %s parameters with %s", f"{n_params:,}", chosen)
    if chosen == "lora":
        if cfg.base_dtype is not None:
            model = model.to(_dtype(cfg.base_dtype))
        model.requires_grad_(False)
        model = _lora(model, lora_r, lora_alpha, lora_dropout, target_modules)
        for p in model.parameters():  # adapters in fp32 (they are the trained weights)
            if p.requires_grad:
                p.data = p.data.float()
    else:
        model = model.float().requires_grad_(True)
    model.train()
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
    )
    global_batch = cfg.batch_size * cfg.grad_accum
    steps_per_epoch = math.ceil(len(train_exs) / global_batch)
    total = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(total, cfg.warmup_ratio))
    pad = data.pad_id_of(tokenizer)
    torch.manual_seed(cfg.seed)
    metrics, tokens_seen, t0 = [], 0, time.perf_counter()
    bar = tqdm(total=total, desc=f"finetune ({chosen})", unit="step", disable=not cfg.progress)
    for step in range(total):
        epoch, pos = divmod(step, steps_per_epoch)
        order = _order(len(train_exs), cfg.seed, epoch)
        batch = [train_exs[i] for i in order[pos * global_batch : (pos + 1) * global_batch]]
        denom = max(1, sum(ex.n_supervised for ex in batch))
        batch.sort(key=lambda e: len(e.input_ids))
        loss_sum = 0.0
        for i in range(0, len(batch), cfg.batch_size):
            ids, mask, labels = (
                t.to(device) for t in data.collate(batch[i : i + cfg.batch_size], pad)
            )
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                logits = model(input_ids=ids, attention_mask=mask).logits
            loss = torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1),
                shift_targets(labels).flatten(),
                ignore_index=data.IGNORE_INDEX,
                reduction="sum",
            )
            (loss / denom).backward()
            loss_sum += loss.item()
            tokens_seen += int(mask.sum())
            del logits, loss  # [b, T, V] fp32: not alive during the next micro-batch's forward
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        metrics.append({"step": step + 1, "ce": loss_sum / denom})
        bar.update(1)
        bar.set_postfix(ce=f"{loss_sum / denom:.4f}")
    bar.close()
    del opt, sched, params  # the optimizer state is not needed to save (full: 2x the weights)
    gc.collect()

    if chosen == "lora":
        model = model.merge_and_unload()
    model.eval()
    meta = {
        "method": chosen,
        "base": base
        if isinstance(base, str)
        else os.fspath(base)
        if isinstance(base, os.PathLike)
        else "module",
        "params": n_params,
        "steps": total,
        "global_batch": global_batch,
        "tokens_seen": tokens_seen,
        "wall_s": round(time.perf_counter() - t0, 1),
        "data": {
            "source": desc,
            "examples": len(train_exs),
            "fingerprint": data.fingerprint(train_exs),
        },
        "train": dataclasses.asdict(cfg),
        "lora": {"r": lora_r, "alpha": lora_alpha, "dropout": lora_dropout}
        if chosen == "lora"
        else None,
        "final_ce": metrics[-1]["ce"] if metrics else None,
    }
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    # safetensors copies a whole shard into memory before writing it: small shards keep the
    # peak near the weights' own size (a 1.5B fp32 model is 7 GB)
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="1GB")
    tokenizer.save_pretrained(tmp)
    (tmp / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (tmp / FT_JSON).write_text(json.dumps(meta, indent=2, default=str))
    default_modes(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
