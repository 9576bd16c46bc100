"""One training loop for pretraining, adapter tuning and the baselines.

    for step in range(start, total):
        batch   = the step's global batch (a deterministic function of seed and step)
        for micro in the batch (gradient accumulation):
            loss = cross-entropy on the response tokens / targets in the global batch
            loss.backward()
        clip, AdamW step, lr for the next step (linear warm-up, half-cycle cosine)
        callbacks(step, info)       # gate recorder, live plots, your own
        every ckpt_every steps: atomic checkpoint (trainable tensors, optimizer, RNG, step)

Only parameters with ``requires_grad`` reach the optimizer, so the same loop pretrains a whole
model, tunes an adapter on a frozen base (PAPER.md "Training recipe"), or fine-tunes all
weights for a baseline. The data order is a pure function of (seed, step), the learning rate a
pure function of step, and the checkpoint holds everything else, so a run resumed after a
SIGKILL finishes bit-identical to an uninterrupted one on the same machine.

Distributed runs (torchrun, :mod:`adapterlab.distributed`): every rank computes the same global
batch order and takes its share; the gradients of the adapter are averaged across ranks (DDP,
or :func:`~adapterlab.distributed.sync_gradients` for FSDP), so the loss of each rank is scaled
by the world size to keep the global mean. Only rank 0 writes files. The checkpoint counts the
position in global steps, so a run resumes at any world size.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE_INDEX, TokenDataset, collate
from .losses import lm_loss
from .model import Llama
from .distributed import (
    DistributedLengthGroupedSampler, all_reduce_sum, check_replicas, collective_guard, no_sync, rank_and_world,
    reduced_elements, strategy_of, sync_gradients, unwrap, wrap_model,
)

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.json"


# --------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """Hyper-parameters of one run. Defaults follow the release's recipe (PAPER.md).

    steps / epochs: give exactly one. batch_size: the global batch (all ranks, all
    accumulation steps). micro_batch_size: examples per forward pass on one rank (None: the
    whole share at once). lr: absolute learning rate; None -> base_lr * batch_size / 256.
    warmup_steps overrides warmup_epochs. length_group: how many batches' worth of examples are
    sorted by length together (1: random batches; more: less padding, more uniform batches). ckpt_every: steps between checkpoints (0: only at
    the end). out_dir None: write nothing (notebooks, tests).
    """

    steps: Optional[int] = None
    epochs: Optional[float] = None
    batch_size: int = 64
    micro_batch_size: Optional[int] = None
    base_lr: float = 9e-3
    lr: Optional[float] = None
    min_lr: float = 0.0
    warmup_epochs: float = 0.0
    warmup_steps: Optional[int] = None
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.02
    clip: Optional[float] = None
    seed: int = 0
    length_group: int = 8
    log_every: int = 10
    eval_every: Optional[int] = None
    ckpt_every: int = 50
    checkpoint: bool = True
    out_dir: Optional[str] = None
    resume: bool = False
    record_gates: bool = True
    progress: bool = True
    desc: str = "train"
    check_replicas: bool = False  # debug: assert identical adapters on every rank after every step

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(f"give exactly one of steps or epochs (got steps={self.steps}, epochs={self.epochs})")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1; got {self.steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"epochs must be > 0; got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1; got {self.micro_batch_size}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1; got {self.log_every}")
        self.betas = tuple(self.betas)

    @property
    def peak_lr(self) -> float:
        """The learning rate after warm-up: lr, or base_lr * batch_size / 256 (the release's rule)."""
        return self.lr if self.lr is not None else self.base_lr * self.batch_size / 256

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Schedule:
    """Step counts of a run, resolved from the config and the data size."""

    total_steps: int
    steps_per_epoch: int
    warmup_steps: int

    @classmethod
    def resolve(cls, config: TrainConfig, n_examples: int) -> "Schedule":
        spe = n_examples // config.batch_size
        if spe < 1:
            raise ValueError(
                f"the data set has {n_examples} examples, fewer than one global batch of {config.batch_size}; "
                "lower --batch-size or add data"
            )
        total = config.steps if config.steps is not None else max(1, math.ceil(config.epochs * spe))
        warmup = config.warmup_steps if config.warmup_steps is not None else round(config.warmup_epochs * spe)
        return cls(total_steps=total, steps_per_epoch=spe, warmup_steps=min(warmup, total))


def lr_at(step: int, schedule: Schedule, peak: float, min_lr: float = 0.0) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then half-cycle cosine to min_lr."""
    if step < schedule.warmup_steps:
        return peak * step / schedule.warmup_steps
    span = max(1, schedule.total_steps - schedule.warmup_steps)
    progress = (step - schedule.warmup_steps) / span
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- small helpers
class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN/inf; the last good checkpoint is kept."""


class CheckpointMismatch(ValueError):
    """A checkpoint to resume from was written for another model, adapter or data order."""


class Callback:
    """Base class for callbacks. A plain function ``f(step, info)`` works too (called every step).

    on_start(state): before the first step; state has start_step, total_steps, resumed, out_dir, model.
    on_step(step, info): after every optimizer step (info: see :func:`train`).
    on_end(info): after the last step, with the final metrics.
    """

    def on_start(self, state: dict) -> None:
        pass

    def on_step(self, step: int, info: dict) -> None:
        pass

    def on_end(self, info: dict) -> None:
        pass


def _call(cb: Any, event: str, *args) -> None:
    if hasattr(cb, event):
        getattr(cb, event)(*args)
    elif event == "on_step" and callable(cb):
        cb(*args)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename over it: readers (and a
    process killed at any moment) see the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def make_optimizer(named: Sequence[tuple[str, nn.Parameter]], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with the release's betas; weight decay on matrices (ndim >= 2) only, as timm's
    ``param_groups_weight_decay`` used by the release (norm weights, biases, 1-d gates: none)."""
    decay = [p for _, p in named if p.ndim >= 2]
    no_decay = [p for _, p in named if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": config.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=config.peak_lr, betas=config.betas)


def loss_sum(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the positions whose label is not IGNORE_INDEX.

    tokens, labels: (B, T). Position t predicts labels[:, t + 1]. What it computes is this:

        logits = model(tokens)                                   # (B, T, vocab)
        F.cross_entropy(logits[:, :-1], labels[:, 1:], reduction="sum", ignore_index=-100)

    Speed (marked, see benchmarks/README.md): when the output head is frozen (adapter or LoRA
    tuning of an adapterlab Llama, alone or in DDP) the same value comes from
    :func:`adapterlab.losses.lm_loss`, which never builds the (B, T, vocab) logits and skips the
    head on prompt tokens (label -100): less memory, and +33% tokens/s on a 32,000-word
    vocabulary on the CPU. Other models (full fine-tuning, FSDP, wrappers) take the line above.
    """
    if _head_is_fusable(model):
        return lm_loss(model, tokens, labels, reduction="sum", mode="fused")
    logits = model(tokens)  # (B, T, vocab)
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def _head_is_fusable(model: nn.Module) -> bool:
    """An adapterlab Llama (or DDP around one) whose output head is frozen."""
    raw = unwrap(model)
    return isinstance(raw, Llama) and strategy_of(model) != "fsdp" and not raw.output.weight.requires_grad


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA, plain fp32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():  # (the run may resume on fewer GPUs)
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a training checkpoint (tensors and plain values only: ``weights_only=True``)."""
    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- the loop
def train(
    model: nn.Module,
    train_data: TokenDataset,
    config: TrainConfig,
    eval_fn: Optional[Callable[[nn.Module], dict | float]] = None,
    callbacks: Iterable[Any] = (),
) -> dict:
    """Train the parameters of ``model`` that require grad on ``train_data``; return the metrics.

    train_data: a :class:`~adapterlab.data.TokenDataset` (instruction examples or text windows).
    eval_fn(model) -> dict of numbers (or one number), run every ``eval_every`` steps and at the end.
    callbacks: objects with on_start/on_step/on_end (see :class:`Callback`) or functions
    ``f(step, info)``; info = {step, total_steps, epoch, loss, lr, grad_norm, tokens, eval, model}.
    With ``out_dir`` set, writes checkpoint.pt, metrics.json and (for a model with an adapter)
    gates.jsonl and gates.png there.

    Under torchrun pass the model wrapped by :func:`adapterlab.distributed.wrap_model` (DDP or
    FSDP); an unwrapped model in a process group of several ranks is wrapped with DDP here.
    Callbacks and eval_fn always get the unwrapped model.
    """
    rank, world = rank_and_world()
    is_main = rank == 0
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameter (requires_grad=True); attach an adapter or unfreeze it")
    if world > 1 and strategy_of(model) == "none":
        model = wrap_model(model, "ddp")  # the ranks' gradients must be averaged
    raw = unwrap(model)  # the user's model: names, gates, checkpoints (the same at any world size)
    named = trainable_parameters(raw)
    device = named[0][1].device
    schedule = Schedule.resolve(config, len(train_data))
    sampler = DistributedLengthGroupedSampler(train_data.lengths, config.batch_size, config.seed, rank, world,
                                              config.micro_batch_size, group=config.length_group)
    optimizer = make_optimizer(named, config)
    out_dir = Path(config.out_dir) if config.out_dir else None
    if out_dir is not None and is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(".*.tmp"):  # left by a run killed while writing a file
            stale.unlink(missing_ok=True)
    ckpt_path = out_dir / CHECKPOINT_NAME if out_dir is not None else None

    callbacks = list(callbacks)
    if out_dir is not None and config.record_gates and is_main and _has_adapter(raw):
        from .gates import GateRecorder

        if not any(isinstance(cb, GateRecorder) for cb in callbacks):
            callbacks.insert(0, GateRecorder(out_dir, every=config.log_every))

    # ---- state, fresh or resumed
    torch.manual_seed(config.seed)
    start_step, train_seconds = 0, 0.0
    history: dict[str, list] = {"loss": [], "eval": []}
    resumed = False
    if config.resume and ckpt_path is not None and ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path)
        _restore(raw, optimizer, named, ckpt, config, ckpt_path)
        start_step, train_seconds, history = ckpt["step"], ckpt["train_seconds"], ckpt["history"]
        resumed = True
    elif config.resume and is_main:
        print(f"[{config.desc}] --resume: no checkpoint in {out_dir}, starting from step 0")

    state = {"start_step": start_step, "total_steps": schedule.total_steps, "resumed": resumed,
             "out_dir": out_dir, "model": raw, "config": config, "schedule": schedule}
    for cb in callbacks:
        _call(cb, "on_start", state)

    peak = config.peak_lr
    loss_scale = float(world)  # gradients are averaged over ranks; the loss is a mean over the global batch
    params = [p for _, p in named]
    tokens_seen = 0
    model.train()
    bar = None
    if config.progress and is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=schedule.total_steps, initial=start_step, desc=config.desc, unit="step", dynamic_ncols=True)
    t0 = time.perf_counter()
    last_loss = history["loss"][-1][1] if history["loss"] else float("nan")
    try:
        for step in range(start_step, schedule.total_steps):
            global_batch = sampler.global_batch(step)
            n_targets = max(1, train_data.n_targets(global_batch))  # the loss is a mean over the global batch
            lr = lr_at(step, schedule, peak, config.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr

            step_loss = 0.0
            micro_batches = sampler.micro_batches(step)
            with collective_guard(f"training step {step + 1}", hint=_resume_hint(ckpt_path)):
                for i, part in enumerate(micro_batches):
                    tokens, labels = collate([train_data[j] for j in part])
                    tokens, labels = tokens.to(device), labels.to(device)
                    with no_sync(model, skip=i < len(micro_batches) - 1):  # DDP: all-reduce after the last one
                        with autocast_for(device):
                            loss = loss_sum(model, tokens, labels) / n_targets
                        (loss * loss_scale).backward()
                    step_loss += loss.item()
                    tokens_seen += tokens.numel()
                sync_gradients(model)  # FSDP: average the (unsharded) adapter gradients; DDP did it already
                step_loss = all_reduce_sum(step_loss)

            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.clip if config.clip else float("inf"))
            if not (math.isfinite(step_loss) and torch.isfinite(grad_norm)):
                raise TrainingDiverged(_diverged_message(step, step_loss, float(grad_norm), lr, ckpt_path))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            if config.check_replicas:
                check_replicas(model, done)
            last_loss = step_loss

            log_now = done % config.log_every == 0 or done == schedule.total_steps
            if log_now:
                history["loss"].append([done, step_loss])
            eval_result = None
            if eval_fn is not None and config.eval_every and done % config.eval_every == 0 and done != schedule.total_steps:
                eval_result = _run_eval(raw, eval_fn, done)
                history["eval"].append(eval_result)
            info = {"step": done, "total_steps": schedule.total_steps, "epoch": done / schedule.steps_per_epoch,
                    "loss": step_loss, "lr": lr, "grad_norm": float(grad_norm), "tokens": tokens_seen,
                    "eval": eval_result, "model": raw, "log": log_now}
            for cb in callbacks:
                _call(cb, "on_step", done, info)
            if bar is not None:
                bar.update(1)
                if log_now:
                    bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")

            if ckpt_path is not None and config.checkpoint and is_main and (
                (config.ckpt_every and done % config.ckpt_every == 0) or done == schedule.total_steps
            ):
                elapsed = train_seconds + time.perf_counter() - t0
                _save(ckpt_path, optimizer, named, config, done, schedule, elapsed, history, sampler, world)
    finally:
        if bar is not None:
            bar.close()
    train_seconds += time.perf_counter() - t0

    if eval_fn is not None and (not history["eval"] or history["eval"][-1]["step"] != schedule.total_steps):
        history["eval"].append(_run_eval(raw, eval_fn, schedule.total_steps))
    metrics = {
        "steps": schedule.total_steps,
        "epochs": schedule.total_steps / schedule.steps_per_epoch,
        "steps_per_epoch": schedule.steps_per_epoch,
        "batch_size": config.batch_size,
        "lr": peak,
        "final_loss": last_loss,
        "loss_history": history["loss"],
        "eval_history": history["eval"],
        "train_seconds": round(train_seconds, 2),
        "trainable_params": sum(p.numel() for p in params),
        "total_params": sum(p.numel() for p in raw.parameters()),
        "world_size": world,
        "strategy": strategy_of(model),
        "all_reduced_elements": reduced_elements(model)["elements"] if world > 1 else 0,
        "examples": len(train_data),
        "truncated_examples": train_data.n_truncated,
        "resumed_from_step": start_step if resumed else None,
        "config": config.to_dict(),
    }
    if history["eval"]:
        metrics["eval"] = history["eval"][-1]
    for cb in callbacks:
        _call(cb, "on_end", metrics)
    if out_dir is not None and is_main:
        write_metrics(out_dir, metrics, update=False)  # a new file: nothing left from an older run
    return metrics


def write_metrics(out_dir: str | os.PathLike, metrics: dict, update: bool = True) -> Path:
    """Write (merge into, when update) ``out_dir/metrics.json`` atomically."""
    path = Path(out_dir) / METRICS_NAME
    merged = {}
    if update and path.is_file():
        try:
            merged = json.loads(path.read_text())
        except json.JSONDecodeError:
            merged = {}
    merged.update(metrics)
    atomic_write_text(path, json.dumps(merged, indent=2, default=_json_default) + "\n")
    return path


def _json_default(x):
    if isinstance(x, (Path, torch.device)):
        return str(x)
    if isinstance(x, torch.Tensor):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _has_adapter(model: nn.Module) -> bool:
    layers = getattr(model, "layers", None)
    return layers is not None and any(getattr(l.attention, "adapter", None) is not None for l in layers)


def _run_eval(model: nn.Module, eval_fn: Callable, step: int) -> dict:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        result = eval_fn(model)
    model.train(was_training)
    if not isinstance(result, dict):
        result = {"eval": float(result)}
    return {"step": step, **result}


def _diverged_message(step: int, loss: float, grad_norm: float, lr: float, ckpt: Optional[Path]) -> str:
    where = (f"The last good checkpoint is kept at {ckpt} (resume with --resume)."
             if ckpt is not None and ckpt.is_file() else "No checkpoint was written before this step.")
    return (f"training diverged at step {step + 1}: loss={loss}, gradient norm={grad_norm} (lr={lr:.3g}). "
            f"The update was not applied. {where} Try a lower learning rate (--lr/--blr) or gradient clipping.")


def _resume_hint(ckpt: Optional[Path]) -> str:
    if ckpt is not None and ckpt.is_file():
        return f"The last checkpoint {ckpt} is intact: rerun with --resume (any number of processes)."
    return ""


def _save(path: Path, optimizer, named, config: TrainConfig, step: int, schedule: Schedule,
          train_seconds: float, history: dict, sampler: DistributedLengthGroupedSampler, world: int) -> None:
    """Everything a resumed run needs, nothing that depends on the number of processes (the data
    position is the global step; ``world_size`` is recorded for information only)."""
    atomic_torch_save({
        "step": step,
        "trainable": {n: p.detach().cpu().clone() for n, p in named},
        "optimizer": optimizer.state_dict(),
        "scheduler": {"step": step, "total_steps": schedule.total_steps, "warmup_steps": schedule.warmup_steps},
        "data_position": sampler.position(step),
        "world_size": world,
        "rng": _rng_state(),
        "config": {k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool, type(None)))},
        "train_seconds": train_seconds,
        "history": history,
    }, path)


def _restore(model, optimizer, named, ckpt: dict, config: TrainConfig, path: Path) -> None:
    saved = ckpt["trainable"]
    names = [n for n, _ in named]
    if set(saved) != set(names):
        missing, extra = sorted(set(names) - set(saved)), sorted(set(saved) - set(names))
        raise CheckpointMismatch(
            f"{path} was written for a different model or adapter: trainable tensors missing from it: "
            f"{missing[:4]}{'...' if len(missing) > 4 else ''}, unexpected in it: {extra[:4]}{'...' if len(extra) > 4 else ''}. "
            "Resume with the same --base/--adapter-layers/--prompt-len, or use a new --out folder."
        )
    for n, p in named:
        if saved[n].shape != p.shape:
            raise CheckpointMismatch(f"{path}: tensor {n} has shape {tuple(saved[n].shape)}, the model has {tuple(p.shape)}; "
                             "resume with the same model and adapter settings, or use a new --out folder")
    for key in ("batch_size", "seed"):
        if ckpt["config"].get(key) != getattr(config, key):
            raise CheckpointMismatch(f"{path} was written with {key}={ckpt['config'].get(key)}, this run has "
                             f"{key}={getattr(config, key)}; resume with the same value (the data order depends on it)")
    # micro_batch_size (like the number of processes) only changes how a global batch is cut: same run
    changed = [k for k in ("steps", "epochs", "lr", "base_lr", "warmup_steps", "warmup_epochs")
               if ckpt["config"].get(k) != getattr(config, k)]
    if changed:
        warnings.warn(f"resuming {path} with changed settings {changed}: the run will differ from an uninterrupted one")
    with torch.no_grad():
        for n, p in named:
            p.copy_(saved[n].to(p.device, p.dtype))
    optimizer.load_state_dict(ckpt["optimizer"])
    _set_rng_state(ckpt["rng"])


__all__ = [
    "TrainConfig", "Schedule", "lr_at", "train", "Callback", "TrainingDiverged", "CheckpointMismatch", "loss_sum",
    "make_optimizer",
    "load_checkpoint", "write_metrics", "atomic_write_text", "atomic_write_bytes", "atomic_torch_save",
    "rank_and_world", "trainable_parameters", "autocast_for",
]
