"""The training loop: ``train_value(base, value_init, data, config) -> Path``.

Contract
--------
- The base is frozen (``requires_grad=False``, eval mode, any dtype: ``base_dtype="bfloat16"``
  halves its memory); every parameter of the value network trains (fp32 master weights,
  optional bf16 autocast for compute).
- Optimisation: AdamW (``lr``, ``weight_decay``), linear warmup over ``ceil(warmup_ratio *
  steps)`` steps then cosine decay to 0, gradient accumulation, clipping to ``max_grad_norm``.
- One optimizer step consumes a global batch of ``batch_size * grad_accum * world_size``
  examples. The loss of a step is normalised by the token counts of the whole global batch
  (supervised tokens for the CE, penalty positions for the norm penalty), so accumulation and
  data parallelism give the same update as one big batch. Within a global batch, examples are
  sorted by length before being cut into micro-batches (less padding).
- Data order: epoch ``e`` uses the permutation drawn from ``seed`` and ``e`` alone, so a resumed
  run sees exactly the examples an uninterrupted run would.
- Files under ``out_dir``: ``metrics.jsonl`` (one JSON object per logged step / eval),
  ``checkpoints/step-NNNNNNN/`` (atomic: written to a temporary folder, then renamed; the value
  network as an HF folder + ``optimizer.safetensors`` + ``rng.safetensors`` +
  ``trainer_state.json``), and at the end the artefact itself (HF folder + tokenizer +
  ``ivl.json``, see :mod:`ivl.train.artefact`) and ``loss.png`` when matplotlib is importable.
- ``resume=True`` continues from the newest checkpoint: weights, optimizer, scheduler, RNG and
  position in the data order, with bit-identical results to a run that was never stopped.
- Multi-process: when ``torch.distributed`` is initialised (e.g. under ``torchrun``), each
  process takes every ``world_size``-th example of the sorted global batch, gradients are summed
  with ``all_reduce`` (gloo or nccl), and only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ivl._fs import default_modes
from ivl.train import artefact, data, schemes
from ivl.train.loss import merged_loss

logger = logging.getLogger("ivl")

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
_FIRST_N = re.compile(r"^first-(\d+)-layers(?::(.+))?$")
_RANDOM_N = re.compile(r"^random-(\d+)-layers$")


@dataclass
class TrainConfig:
    """Settings of :func:`train_value` (defaults follow the authors' recipe where it has one)."""

    out_dir: str = "ivl-value"
    scheme: str = "residual"
    # optimisation
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.01
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 4  # examples per micro-batch per process
    grad_accum: int = 8
    max_grad_norm: float = 1.0
    bf16: bool = False  # autocast value (and base) compute to bf16
    base_dtype: str | None = None  # e.g. "bfloat16"; default: the dtype stored in the folder
    device: str | None = None  # default: cuda (cuda:LOCAL_RANK) when available, else cpu
    shard_base: bool = False  # multi-process: FSDP2-shard the frozen base's decoder layers
    seed: int = 0
    # loss
    lam: float = 1.0
    masked: bool = False
    chunk_size: int | None = None
    # data
    max_length: int = 2048
    truncation: str = "right"
    eval_fraction: float = 0.0
    eval_examples: int | None = None  # cap on held-out examples
    # logging and checkpoints
    log_every: int = 1
    eval_every: int = 0  # 0: evaluate at the end only
    save_every: int = 0  # 0: checkpoint at the end only
    keep_checkpoints: int = 2
    progress: bool = True
    resume: bool = False
    overwrite: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        schemes.check_scheme(self.scheme)
        if self.truncation not in data.TRUNCATION_POLICIES:
            raise ValueError(f"unknown truncation {self.truncation!r}")
        for name in ("batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.lam < 0 or not 0 <= self.warmup_ratio < 1:
            raise ValueError("need lr > 0, lam >= 0 and 0 <= warmup_ratio < 1")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_steps is None and self.epochs <= 0:
            raise ValueError("epochs must be > 0 (or set max_steps)")


# ----------------------------------------------------------------------------------------------
# helpers


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _dist()[1] > 1:
        torch.distributed.barrier()


def check_writable(out: Path) -> None:
    """Create ``out`` and prove we can write there (before any long work)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"output folder {out} is not writable: {e.strerror or e}") from None


def _default_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def shard_frozen_base(model, device: torch.device) -> None:
    """Shard each decoder layer of the frozen base over all processes (FSDP2 ``fully_shard``).

    Every process then holds 1/world_size of the decoder layers' weights; a layer's weights are
    all-gathered for its forward and freed right after. The embeddings, final norm and LM head
    stay whole on every process (the chunked loss reads the head directly). The base is
    frozen and run under ``no_grad``, so sharding needs all-gathers only.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(
            f"shard_base needs a llama/qwen2-style model (model.model.layers); "
            f"{type(model).__name__} has none"
        )
    mesh = init_device_mesh(device.type, (_dist()[1],))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    model.to(device)  # the parts left whole; sharded layers are already on the mesh's device
    logger.info(
        "base: %d decoder layers sharded over %d processes (FSDP2)", len(layers), mesh.size()
    )


def _check_causal_lm_source(source, what: str) -> None:
    """Raise ValueError if ``source`` (a loaded model, zoo name or folder) is not a causal LM.

    Folders are judged by their config alone, so nothing heavy is loaded yet.
    """
    from ivl.models.loading import _check_causal_lm, _resolve

    if isinstance(source, torch.nn.Module):
        try:
            schemes.head_of(source)
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None
        return
    path, entry = _resolve(source)
    if entry is None:  # zoo entries are causal LMs by construction
        try:
            _check_causal_lm(path, False)
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None


def _dtype(name):
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        dt = getattr(torch, str(name))
    except AttributeError:
        dt = None
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; use e.g. float32 or bfloat16")
    return dt


def _name(x) -> str:
    return x if isinstance(x, str) else (os.fspath(x) if isinstance(x, os.PathLike) else "module")


def build_value(value_init, base, base_source, *, seed: int = 0):
    """The trainable value network (fp32) from ``value_init`` (see :func:`train_value`)."""
    from transformers import AutoModelForCausalLM

    from ivl.models.loading import load_model

    if isinstance(value_init, torch.nn.Module):
        return value_init.float()
    spec = os.fspath(value_init)
    m = _RANDOM_N.match(spec)
    if spec == "random" or m:
        cfg = base.config if m is None else _cut_config(base, int(m.group(1)))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return AutoModelForCausalLM.from_config(cfg).float()
    m = _FIRST_N.match(spec)
    if m:
        n = int(m.group(1))
        src = base if m.group(2) is None else load_model(m.group(2), dtype=torch.float32)
        return truncate_layers(src, n)
    if base_source is not None and spec == _name(base_source):
        logger.info("value network initialised from the base checkpoint %s", spec)
    return load_model(value_init, dtype=torch.float32)


def _cut_config(model, n: int):
    """A copy of ``model``'s config with only the first ``n`` decoder layers."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(
            f"first-N-layers / random-N-layers need a llama/qwen2-style model "
            f"(model.model.layers); {type(model).__name__} has none"
        )
    if not 1 <= n <= len(layers):
        raise ValueError(f"{n} layers requested: the model has {len(layers)} layers")
    cfg = model.config.__class__.from_dict(model.config.to_dict())
    cfg.num_hidden_layers = n
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = list(cfg.layer_types)[:n]
    return cfg


def truncate_layers(model, n: int):
    """A new fp32 model with the first ``n`` decoder layers (+ embeddings, final norm, head)."""
    from transformers import AutoModelForCausalLM

    small = AutoModelForCausalLM.from_config(_cut_config(model, n)).float()
    src = model.state_dict()
    want = small.state_dict()
    missing = [k for k in want if k not in src]
    if missing:
        raise ValueError(f"cannot truncate {type(model).__name__}: missing {missing[:3]}")
    small.load_state_dict({k: src[k].float() for k in want})
    small.tie_weights()
    return small


def _schedule(total: int, warmup_ratio: float) -> Callable[[int], float]:
    warm = math.ceil(warmup_ratio * total) if warmup_ratio > 0 else 0

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def _order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


# ----------------------------------------------------------------------------------------------
# checkpoints


def _save_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    from safetensors.torch import save_file

    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}/{k}"] = v.contiguous()
            else:
                scalars[f"{pid}/{k}"] = v
    save_file(tensors, path / "optimizer.safetensors")
    meta = {"param_groups": sd["param_groups"], "scalars": scalars}
    (path / "optimizer.json").write_text(json.dumps(meta))


def _load_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(path / "optimizer.safetensors")
    meta = json.loads((path / "optimizer.json").read_text())
    state: dict[int, dict] = {}
    for key, v in [*tensors.items(), *meta["scalars"].items()]:
        pid, k = key.split("/", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _checkpoints(out: Path) -> list[Path]:
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if re.fullmatch(r"step-\d+", p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _save_checkpoint(out, step, value, opt, sched, state, keep) -> Path:
    from safetensors.torch import save_file

    root = out / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    value.save_pretrained(tmp, safe_serialization=True)
    _save_optimizer(opt, tmp)
    save_file({"torch": torch.get_rng_state()}, tmp / "rng.safetensors")
    full = {**state, "step": step, "scheduler": sched.state_dict()}
    (tmp / "trainer_state.json").write_text(json.dumps(full, indent=1))
    default_modes(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in _checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------------------------
# the loop


def _resolve_data(source, tokenizer, cfg: TrainConfig):
    """(train examples, eval examples, description) from a path, recipe or iterable."""
    from ivl.train import recipes

    desc = _name(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__
    eval_source = None
    if isinstance(source, str) and source in recipes.RECIPES:
        # Recipes have their own held-out split; its size: eval_examples, else 200 when
        # eval_fraction > 0, else none.
        n_eval = cfg.eval_examples
        if n_eval is None:
            n_eval = 200 if cfg.eval_fraction > 0 else 0
        source, eval_source = recipes.load(source, eval_examples=n_eval, **cfg.extra)
    kw = dict(max_length=cfg.max_length, truncation=cfg.truncation)
    train = data.load_examples(source, tokenizer, **kw)
    if eval_source is not None:
        evals = data.load_examples(eval_source, tokenizer, **kw) if eval_source else []
        return train, evals, desc
    n_eval = round(cfg.eval_fraction * len(train))
    if cfg.eval_examples is not None:
        n_eval = min(n_eval, cfg.eval_examples) if cfg.eval_fraction else cfg.eval_examples
    if n_eval:
        if n_eval >= len(train):
            raise ValueError(f"eval split of {n_eval} leaves no training examples")
        order = _order(len(train), cfg.seed, -1)
        held = set(order[:n_eval])
        evals = [ex for i, ex in enumerate(train) if i in held]
        train = [ex for i, ex in enumerate(train) if i not in held]
        return train, evals, desc
    return train, [], desc


class _Runner:
    def __init__(self, base, value, tokenizer, cfg: TrainConfig):
        self.base, self.value, self.cfg = base, value, cfg
        self.pad = data.pad_id_of(tokenizer)
        self.head_b = schemes.head_of(base)
        self.head_v = schemes.head_of(value)
        self.device = next(value.parameters()).device
        self.rank, self.world = _dist()

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16)

    def micro_loss(self, exs, ce_den, pen_den, *, value_head=True):
        ids, mask, labels = (t.to(self.device) for t in data.collate(exs, self.pad))
        with self.autocast():
            with torch.no_grad():
                hb = schemes.hidden_states(self.base, ids, mask)
            wb, bb, cb = self.head_b
            if value_head:
                hv = schemes.value_hidden_states(
                    self.value, self.cfg.scheme, ids, mask, h_base=hb, base=self.base
                )
                wv, bv, cv = self.head_v
            else:  # the base alone: a zero value head (z_value = 0)
                hv = torch.zeros(*ids.shape, 1, device=self.device)
                wv, bv, cv = torch.zeros(wb.shape[0], 1, device=self.device), None, None
        loss, parts = merged_loss(
            hb,
            wb,
            hv,
            wv,
            labels,
            lam=self.cfg.lam if value_head else 0.0,
            masked=self.cfg.masked,
            attention_mask=mask,
            b_base=bb,
            b_value=bv,
            softcap_base=cb,
            softcap_value=cv,
            ce_denominator=ce_den,
            penalty_denominator=pen_den,
            chunk_size=self.cfg.chunk_size,
        )
        return loss, parts, int(mask.sum())

    def pen_count(self, ex) -> int:
        return ex.n_supervised if self.cfg.masked else len(ex.input_ids)

    def micro_batches(self, exs):
        """This process's micro-batches of a global batch (sorted by length, strided by rank)."""
        exs = sorted(exs, key=lambda e: len(e.input_ids))[self.rank :: self.world]
        b = self.cfg.batch_size
        return [exs[i : i + b] for i in range(0, len(exs), b)]

    @torch.no_grad()
    def evaluate(self, exs, *, value_head=True) -> dict[str, float]:
        """Mean merged CE (and penalty) over ``exs`` (every process computes all of it)."""
        ce, n, pen, npen = 0.0, 0, 0.0, 0
        b = self.cfg.batch_size
        was_training = self.value.training
        self.value.eval()
        for i in range(0, len(exs), b):
            _, parts, _ = self.micro_loss(exs[i : i + b], None, None, value_head=value_head)
            ce, n = ce + parts.ce_sum, n + parts.n_ce
            pen, npen = pen + parts.penalty_sum, npen + parts.n_penalty
        self.value.train(was_training)
        return {"ce": ce / max(n, 1), "penalty": pen / max(npen, 1)}


def train_value(
    base,
    value_init,
    data_source,
    config: TrainConfig | None = None,
    *,
    tokenizer=None,
    callbacks: Sequence[Callable[[dict], None]] = (),
) -> Path:
    """Train a value network against a frozen ``base``; return the artefact folder.

    Parameters
    ----------
    base : str, path or PreTrainedModel
        Zoo name or HF folder of the frozen training base (or a loaded causal LM; then pass
        ``tokenizer``).
    value_init : str, path or PreTrainedModel
        A pretrained checkpoint (zoo name or folder; must use the base's tokenizer),
        ``"random"`` (the base's config, freshly initialised from ``config.seed``),
        ``"first-N-layers"`` (the first N decoder layers of the base, with its embeddings, final
        norm and head), ``"first-N-layers:NAME_OR_PATH"`` (the same from another checkpoint) or
        ``"random-N-layers"`` (the base's config cut to N layers, freshly initialised: a small
        value network whose logits start near 0, so the merged model starts near the base).
    data_source : str, path or iterable of dicts
        A JSONL file (see :mod:`ivl.train.data`), a built-in recipe (``"gsm-symbolic"``,
        ``"sharegpt"``; see :mod:`ivl.train.recipes`) or any iterable of records (e.g. a HF
        ``datasets.Dataset``).
    config : TrainConfig
        Hyper-parameters, output folder, logging and checkpoint settings.
    callbacks : sequence of callables
        Called as ``cb(metrics)`` after every optimizer step (after any checkpoint of that
        step); an exception raised there stops the run like a kill (the newest checkpoint
        stays resumable).

    Examples
    --------
    >>> cfg = TrainConfig(out_dir="runs/v1", epochs=1, eval_fraction=0.05)
    >>> train_value("smollm2-135m-instruct", "first-8-layers", "gsm-symbolic", cfg)
    ... # doctest: +SKIP
    PosixPath('runs/v1')
    """
    from ivl.models.loading import load_model, load_tokenizer

    cfg = dataclasses.replace(config) if config is not None else TrainConfig()
    cfg.validate()
    rank, world = _dist()
    out = Path(cfg.out_dir).expanduser()
    if rank == 0:
        check_writable(out)
        ckpts = _checkpoints(out)
        if not cfg.resume and not cfg.overwrite and (ckpts or (out / artefact.IVL_JSON).exists()):
            raise ValueError(
                f"{out} already holds a training run; pass resume=True (--resume) to continue "
                f"it, overwrite=True (--overwrite) to start over, or choose another folder"
            )
        if cfg.overwrite and not cfg.resume:
            shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
            (out / METRICS).unlink(missing_ok=True)
    _barrier()

    # Cheap checks first (configs, tokenizers, data): every such error surfaces before any
    # weights are loaded or training starts.
    _check_causal_lm_source(base, "base")
    if tokenizer is None:
        if isinstance(base, torch.nn.Module):
            raise ValueError("pass tokenizer= when base is a loaded model")
        tokenizer = load_tokenizer(base)
    tok_fp = artefact.tokenizer_fingerprint(tokenizer)
    vi = value_init if isinstance(value_init, torch.nn.Module) else os.fspath(value_init)
    pretrained_value = (
        isinstance(vi, str)
        and vi != "random"
        and not _FIRST_N.match(vi)
        and not _RANDOM_N.match(vi)
    )
    # the checkpoint the value's weights come from: a pretrained model, or first-N-layers:SRC
    cut = _FIRST_N.match(vi) if isinstance(vi, str) else None
    source = vi if pretrained_value else (cut.group(2) if cut else None)
    if source is not None:
        _check_causal_lm_source(source, "value_init")
    if source is not None and (isinstance(base, torch.nn.Module) or source != _name(base)):
        vfp = artefact.tokenizer_fingerprint(load_tokenizer(source))
        if vfp != tok_fp:
            raise ValueError(
                f"the value checkpoint {source!r} uses a different tokenizer from the base; "
                f"{cfg.scheme} training needs one shared tokenizer: initialise the value "
                f"from a checkpoint of the base's family, or use 'random' / 'first-N-layers'"
            )
    train_exs, eval_exs, data_desc = _resolve_data(data_source, tokenizer, cfg)
    data_fp = data.fingerprint(train_exs)
    logger.info("data: %d training / %d held-out examples", len(train_exs), len(eval_exs))

    # Models (loaded on the CPU, then moved: the value may be cut from the base's weights).
    if isinstance(base, torch.nn.Module):
        base_model = base
        device = torch.device(cfg.device) if cfg.device else next(base.parameters()).device
    else:
        base_model = load_model(base, dtype=_dtype(cfg.base_dtype))
        device = _default_device(cfg.device)
    schemes.head_of(base_model)  # a causal LM?
    if cfg.base_dtype is not None:
        base_model = base_model.to(_dtype(cfg.base_dtype))
    base_model.eval().requires_grad_(False)
    value = build_value(value_init, base_model, base, seed=cfg.seed)
    schemes.head_of(value)
    value.to(device).train()
    value.requires_grad_(True)
    if cfg.shard_base and world > 1:
        shard_frozen_base(base_model, device)
    else:
        if cfg.shard_base:
            logger.info("shard_base ignored: a single process holds the whole base")
        base_model.to(device)
    v_b = base_model.get_output_embeddings().weight.shape[0]
    v_v = value.get_output_embeddings().weight.shape[0]
    if v_b != v_v:
        raise ValueError(f"base and value vocabulary sizes differ ({v_b} vs {v_v})")
    if len(tokenizer) > v_b:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model only {v_b}")

    # Schedule.
    global_batch = cfg.batch_size * cfg.grad_accum * world
    steps_per_epoch = math.ceil(len(train_exs) / global_batch)
    total = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
    params = [p for p in value.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(total, cfg.warmup_ratio))
    torch.manual_seed(cfg.seed)

    step = 0
    # The training budget so far (all tokens of the demonstrations trained on, and seconds of
    # training), kept in checkpoints so a resumed run reports the whole run's.
    budget = {"tokens_seen": 0, "train_s": 0.0}
    if cfg.resume and _checkpoints(out):
        step, budget = _resume(out, value, opt, sched, data_fp, budget)
        logger.info("resumed from step %d of %d", step, total)
    elif rank == 0:
        (out / METRICS).unlink(missing_ok=True)
    _barrier()

    runner = _Runner(base_model, value, tokenizer, cfg)
    state = {
        "data_fingerprint": data_fp,
        "total_steps": total,
        "global_batch": global_batch,
        "config": dataclasses.asdict(cfg),
        "budget": budget,
    }
    metrics_f = (out / METRICS).open("a") if rank == 0 else None

    def log(row: dict) -> None:
        if metrics_f is not None:
            metrics_f.write(json.dumps(row) + "\n")
            metrics_f.flush()

    if step == 0 and eval_exs:
        base_eval = runner.evaluate(eval_exs, value_head=False)
        log({"step": 0, "eval_base_ce": base_eval["ce"]})
        logger.info("held-out NLL of the base alone: %.4f", base_eval["ce"])

    bar = None
    if cfg.progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True)
    t_last, tok_count = time.perf_counter(), 0
    try:
        while step < total:
            epoch, pos = divmod(step, steps_per_epoch)
            order = _order(len(train_exs), cfg.seed, epoch)
            batch = [train_exs[i] for i in order[pos * global_batch : (pos + 1) * global_batch]]
            t_step = time.perf_counter()
            ce_den = max(1, sum(ex.n_supervised for ex in batch))
            pen_den = max(1, sum(runner.pen_count(ex) for ex in batch))
            loss_sum = torch.zeros(3, dtype=torch.float64)  # loss, ce sum, penalty sum
            for mb in runner.micro_batches(batch):
                loss, parts, ntok = runner.micro_loss(mb, ce_den, pen_den)
                loss.backward()
                loss_sum += torch.tensor([loss.item(), parts.ce_sum, parts.penalty_sum])
                tok_count += ntok
            if world > 1:
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    torch.distributed.all_reduce(p.grad)
                torch.distributed.all_reduce(loss_sum)
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            budget["tokens_seen"] += sum(len(ex.input_ids) for ex in batch)
            budget["train_s"] = round(budget["train_s"] + time.perf_counter() - t_step, 3)
            row = {
                "step": step,
                "epoch": step / steps_per_epoch,
                "loss": loss_sum[0].item(),
                "ce": loss_sum[1].item() / ce_den,
                "penalty": loss_sum[2].item() / pen_den,
                "lr": lr,
                "grad_norm": float(gnorm),
            }
            if step % cfg.log_every == 0 or step == total:
                now = time.perf_counter()
                row["tokens_per_s"] = tok_count * world / max(now - t_last, 1e-9)
                t_last, tok_count = now, 0
                log(row)
            if eval_exs and cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                ev = runner.evaluate(eval_exs)
                log({"step": step, "eval_ce": ev["ce"], "eval_penalty": ev["penalty"]})
            if (cfg.save_every and step % cfg.save_every == 0) or step == total:
                if rank == 0:
                    _save_checkpoint(out, step, value, opt, sched, state, cfg.keep_checkpoints)
                _barrier()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{row['loss']:.4f}",
                    lr=f"{lr:.2e}",
                    tok_s=f"{row.get('tokens_per_s', 0):.0f}",
                )
            for cb in callbacks:
                cb(row)
    finally:
        if bar is not None:
            bar.close()
        if metrics_f is not None:
            metrics_f.close()

    final_eval = runner.evaluate(eval_exs) if eval_exs else None
    if rank == 0:
        if final_eval is not None:
            with (out / METRICS).open("a") as f:
                f.write(json.dumps({"step": step, "eval_ce": final_eval["ce"]}) + "\n")
            logger.info("held-out NLL of base + value: %.4f", final_eval["ce"])
        meta = {
            "scheme": cfg.scheme,
            "alpha": 1.0,
            "tokenizer": {"fingerprint": tok_fp, "vocab_size": v_v},
            "training_base": {"name": _name(base), "tokenizer_fingerprint": tok_fp},
            "value_init": _name(value_init),
            "norm": {"lambda": cfg.lam, "masked": cfg.masked},
            "data": {"fingerprint": data_fp, "examples": len(train_exs), "source": data_desc},
            "train": {**dataclasses.asdict(cfg), "steps": step, "global_batch": global_batch},
            "tokens_seen": budget["tokens_seen"],
            "wall_s": round(budget["train_s"], 1),
        }
        if final_eval is not None:
            meta["eval"] = {"merged_ce": final_eval["ce"]}
        _write_artefact(out, value, tokenizer, meta)
        plot_metrics(out)
    _barrier()
    return out


def _resume(out, value, opt, sched, data_fp, budget: dict) -> tuple[int, dict]:
    """Load the last checkpoint; returns its step and training budget (``budget`` when the
    checkpoint predates budgets)."""
    from safetensors.torch import load_file

    ck = _checkpoints(out)[-1]
    st = json.loads((ck / "trainer_state.json").read_text())
    if st["data_fingerprint"] != data_fp:
        raise ValueError(
            f"cannot resume from {ck}: the training data differ from the run's (fingerprint "
            f"mismatch); use the same data and settings, or start a new run"
        )
    weights = load_file(ck / "model.safetensors")
    missing, unexpected = value.load_state_dict(weights, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise ValueError(f"checkpoint {ck} does not match the value network")
    value.tie_weights()
    _load_optimizer(opt, ck)
    sched.load_state_dict(st["scheduler"])
    torch.set_rng_state(load_file(ck / "rng.safetensors")["torch"])
    step = int(st["step"])
    metrics = out / METRICS
    if metrics.exists() and _dist()[0] == 0:
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        metrics.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step))
    return step, st.get("budget", budget)


def _write_artefact(out: Path, value, tokenizer, meta: dict) -> None:
    """Write the HF folder + tokenizer + ivl.json into ``out`` (files moved in, ivl.json last)."""
    tmp = out / f".tmp-final-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    value.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    default_modes(tmp)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()
    artefact.write_ivl_json(out, meta)


def plot_metrics(out: str | os.PathLike[str]) -> Path | None:
    """Write ``loss.png`` (train loss and held-out CE vs step); skip if matplotlib is missing."""
    out = Path(out)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: no loss.png (pip install matplotlib)")
        return None
    rows = [json.loads(x) for x in (out / METRICS).read_text().splitlines() if x.strip()]
    train = [(r["step"], r["loss"], r["ce"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_ce"]) for r in rows if "eval_ce" in r]
    base = [r["eval_base_ce"] for r in rows if "eval_base_ce" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        s, loss, ce = zip(*train, strict=True)
        ax.plot(s, loss, label="train loss (CE + penalty)", lw=1)
        ax.plot(s, ce, label="train merged CE", lw=1)
    if evals:
        s, ce = zip(*evals, strict=True)
        ax.plot(s, ce, "o-", label="held-out merged CE")
    if base:
        ax.axhline(base[0], ls="--", c="gray", label="held-out CE, base alone")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats / token")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "loss.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
