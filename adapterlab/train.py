"""One training loop for pretraining, adapter tuning and the baselines.

    for step in range(start, total):
        batch   = the step's global batch (a deterministic function of seed and step)
        train_step:  for micro in the batch (gradient accumulation):
                         loss = cross-entropy on the response tokens / targets in the global batch
                                (or your loss_fn on your batch_fn's batch: masked tokens, classes, spans)
                         loss.backward()
                     clip, AdamW step
        lr for the next step (linear warm-up, half-cycle cosine)
        callbacks(step, info)       # gate recorder, live plots, your own
        every ckpt_every steps: atomic checkpoint (trainable tensors, optimizer, RNG, step)

Only parameters with ``requires_grad`` reach the optimizer, so the same loop pretrains a whole
model, tunes an adapter on a frozen base (the release's recipe, docs/method.md), or fine-tunes
all weights for a baseline; with a batch and a loss function it also pretrains and tunes the other
models (the ViT, the text encoder, the scene CNN). The data order is a pure function of (seed, step), the learning rate
a pure function of step, and the checkpoint holds everything else, so a run resumed after a
SIGKILL finishes bit-identical to an uninterrupted one on the same machine.

Distributed runs (torchrun, :mod:`adapterlab.distributed`): every rank computes the same global
batch order and takes its share; the gradients of the adapter are averaged across ranks (DDP,
or :func:`~adapterlab.distributed.sync_gradients` for FSDP), so the loss of each rank is scaled
by the world size to keep the global mean. Only rank 0 writes files. The checkpoint counts the
position in global steps, so a run resumes at any world size.

Gates are recorded by a callback the caller attaches, :class:`adapterlab.gates.GateRecorder`
(``gates.jsonl``, and ``gates.png`` at the end). :func:`compile_model` (torch.compile per block)
is an opt-in speed option, as the model's ``activation_checkpointing`` is a memory option.
"""
from __future__ import annotations

import json
import math
import os
import importlib
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Sized

import torch
from torch import nn

from .adapter import trainable_parameters
from .data import StepSampler, TokenDataset, check_batch_sizes, get_batch
from .distributed import (
    all_reduce_sum, check_replicas, collective_guard, no_sync, rank_and_world, reduced_elements, strategy_of,
    sync_gradients, unwrap, wrap_model,
)
from .io.files import atomic_torch_save, atomic_write_text, progress_bar, remove_stale_temps
from .losses import loss_sum
from .model import autocast_for

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.json"
OPTIMIZERS = ("adamw", "sgd")


# --------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """Hyper-parameters of one run. Defaults follow the release's recipe (docs/method.md).

    steps / epochs: give exactly one. batch_size: the global batch (all ranks, all
    accumulation steps). micro_batch_size: examples per forward pass on one rank (None: the
    whole share at once). lr: absolute learning rate; None -> base_lr * batch_size / 256.
    warmup_steps overrides warmup_epochs. length_group: how many batches' worth of examples are
    sorted by length together (1: random batches; more: less padding, more uniform batches).
    ckpt_every: steps between checkpoints (0: only at the end). out_dir None: write nothing
    (notebooks, tests).
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
    optimizer: str = "adamw"  # or "sgd": plain SGD, no momentum (the gate lab compares the two)
    clip: Optional[float] = None
    seed: int = 0
    length_group: int = 8
    log_every: int = 10
    eval_every: Optional[int] = None
    ckpt_every: int = 50
    checkpoint: bool = True
    out_dir: Optional[str] = None
    resume: bool = False
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
        check_batch_sizes(self.batch_size, micro_batch=self.micro_batch_size)
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1; got {self.log_every}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainConfig.optimizer must be one of {OPTIMIZERS}; got {self.optimizer!r}")
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
    def resolve(cls, config: TrainConfig, n_examples: int, drawn: bool = False) -> "Schedule":
        """drawn: the batches are drawn by a ``batch_fn`` (perhaps with replacement), so the data need
        not hold a whole batch; an epoch is then at least one step."""
        if not drawn:
            check_batch_sizes(config.batch_size, n_examples=n_examples)
        spe = max(1, n_examples // config.batch_size)
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


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN/inf; the last good checkpoint is kept."""


class CheckpointMismatch(ValueError):
    """A checkpoint to resume from was written for another model, adapter or data order."""


# --------------------------------------------------------------------------- callbacks
class Callback:
    """Base class for callbacks. A plain function ``f(step, info)`` works too (called every step).

    on_start(state): before the first step; state has start_step, total_steps, resumed, out_dir,
    model, config, schedule, the epoch and lr at start_step, and lr_sum (the learning rates of
    the updates before start_step, summed).
    on_gradients(step, model): optional; once the gradients of step ``step`` are complete, before
    the optimizer uses (and clears) them.
    on_step(step, info): after every optimizer step (info: see :func:`train`).
    on_end(info): after the last step, with the final metrics.
    """

    def on_start(self, state: dict) -> None:
        pass

    def on_step(self, step: int, info: dict) -> None:
        pass

    def on_end(self, info: dict) -> None:
        pass


def _notify(callbacks: Iterable[Any], event: str, *args) -> None:
    for cb in callbacks:
        if hasattr(cb, event):
            getattr(cb, event)(*args)
        elif event == "on_step" and callable(cb):
            cb(*args)


# --------------------------------------------------------------------------- the step
def make_optimizer(named: Sequence[tuple[str, nn.Parameter]], config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the release's betas; weight decay on matrices (ndim >= 2) only, as timm's
    ``param_groups_weight_decay`` used by the release (norm weights, biases, 1-d gates: none).
    ``config.optimizer="sgd"``: plain SGD (step = -lr x gradient) with the same weight decay groups."""
    decay = [p for _, p in named if p.ndim >= 2]
    no_decay = [p for _, p in named if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": config.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.peak_lr)
    return torch.optim.AdamW(groups, lr=config.peak_lr, betas=config.betas)


def token_loss(model: nn.Module, micro_batch: tuple) -> torch.Tensor:
    """The default objective: cross-entropy on the labelled tokens of one micro-batch, divided by
    the labelled tokens of the whole global batch (so the micro-batches' losses sum to its mean).

    micro_batch: (tokens (B, T), labels (B, T), forward_args, n_targets), see :func:`_batches`.
    """
    tokens, labels, forward_args, n_targets = micro_batch
    with autocast_for(tokens.device):
        return loss_sum(model, tokens, labels, **forward_args) / n_targets


def train_step(model: nn.Module, micro_batches: Sequence[Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor],
               optimizer: torch.optim.Optimizer, clip: Optional[float] = None,
               before_update: Optional[Callable[[], None]] = None) -> tuple[float, float]:
    """One optimizer step on this rank's share of a global batch -> (loss, gradient norm).

    micro_batches: the share cut for gradient accumulation; loss_fn(model, micro_batch) -> that
    micro-batch's part of the global batch's mean loss (:func:`token_loss`). The loss is summed over
    the ranks. If the loss or the gradient is not finite the update is not applied (the caller
    stops). before_update(): called once the gradients are complete (averaged over ranks, not yet
    clipped), before the update (the gate recorder reads the gates' gradient there).
    """
    params = [p for _, p in trainable_parameters(unwrap(model))]
    world = rank_and_world()[1]
    loss_total = 0.0
    for i, micro_batch in enumerate(micro_batches):
        with no_sync(model, skip=i < len(micro_batches) - 1):  # DDP: all-reduce after the last one only
            loss = loss_fn(model, micro_batch)
            (loss * world).backward()  # DDP averages the ranks' gradients: x world keeps the global mean
        loss_total += loss.item()
    sync_gradients(model)  # FSDP: average the (unsharded) adapter gradients; DDP did it already
    loss_total = all_reduce_sum(loss_total)
    if before_update is not None:
        before_update()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf")))
    if math.isfinite(loss_total) and math.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_total, grad_norm


# --------------------------------------------------------------------------- the loop
@dataclass
class RunState:
    """Where a run stands: what a checkpoint restores besides the tensors, and running counts."""

    start_step: int = 0
    train_seconds: float = 0.0
    history: dict = field(default_factory=lambda: {"loss": [], "eval": []})
    resumed: bool = False
    tokens: int = 0

    @property
    def last_loss(self) -> float:
        return self.history["loss"][-1][1] if self.history["loss"] else float("nan")


def train(
    model: nn.Module,
    train_data: TokenDataset | Sized,
    config: TrainConfig,
    eval_fn: Optional[Callable[[nn.Module], dict | float]] = None,
    callbacks: Iterable[Any] = (),
    *,
    batch_fn: Optional[Callable[[int], Any]] = None,
    loss_fn: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None,
) -> dict:
    """Train the parameters of ``model`` that require grad on ``train_data``; return the metrics.

    train_data: a :class:`~adapterlab.data.TokenDataset` (instruction examples or text windows,
    with per-example model inputs in ``forward_args`` if the model takes any).
    Another objective (masked tokens, classes, answer spans...) brings its own batches and loss:
    batch_fn(step) -> the batch of optimizer step ``step`` (0-based; called once per step, in
    order, so it may draw from its own generator - a pure function of the step resumes exactly),
    loss_fn(model, batch) -> the batch's mean loss; train_data is then the examples the batches
    come from (its len() counts the epochs). Such a run is one process without micro-batches.
    eval_fn(model) -> dict of numbers (or one number), run every ``eval_every`` steps and at the end.
    callbacks: objects with on_start/on_step/on_end (see :class:`Callback`) or functions
    ``f(step, info)``; info = {step, total_steps, epoch, loss, lr, grad_norm, tokens, eval, model, log}.
    With ``out_dir`` set, writes checkpoint.pt and metrics.json there (gates.jsonl: pass
    ``callbacks=[adapterlab.gates.GateRecorder(out_dir)]``).

    Under torchrun pass the model wrapped by :func:`adapterlab.distributed.wrap_model` (DDP or
    FSDP); an unwrapped model in a process group of several ranks is wrapped with DDP here.
    Callbacks and eval_fn always get the unwrapped model.
    """
    rank, world = rank_and_world()
    is_main = rank == 0
    model = _wrap_for(model, world)
    raw = unwrap(model)  # the user's model: names, gates, checkpoints (the same at any world size)
    named = trainable_parameters(raw)
    device = named[0][1].device
    _check_objective(batch_fn, loss_fn, config, world)
    schedule = Schedule.resolve(config, len(train_data), drawn=batch_fn is not None)
    sampler, batches = _batches(train_data, config, device, rank, world, batch_fn)  # batches(step) -> micro-batches
    loss_fn = loss_fn or token_loss
    optimizer = make_optimizer(named, config)
    out_dir = _prepare_out_dir(config, is_main)
    ckpt_path = out_dir / CHECKPOINT_NAME if out_dir is not None else None
    callbacks = list(callbacks)

    torch.manual_seed(config.seed)
    run = _resume(raw, optimizer, named, config, ckpt_path, is_main)
    _notify(callbacks, "on_start", {
        "start_step": run.start_step, "total_steps": schedule.total_steps, "resumed": run.resumed,
        "out_dir": out_dir, "model": raw, "config": config, "schedule": schedule,
        "epoch": run.start_step / schedule.steps_per_epoch,
        "lr": lr_at(run.start_step, schedule, config.peak_lr, config.min_lr),
        "lr_sum": sum(lr_at(s, schedule, config.peak_lr, config.min_lr) for s in range(run.start_step))})
    bar = _progress_bar(config, schedule, run.start_step) if is_main else None
    model.train()
    t0 = time.perf_counter()
    try:
        for step in range(run.start_step, schedule.total_steps):
            lr = lr_at(step, schedule, config.peak_lr, config.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro_batches = batches(step)
            with collective_guard(f"training step {step + 1}", hint=_resume_hint(ckpt_path)):
                loss, grad_norm = train_step(model, micro_batches, loss_fn, optimizer, config.clip,
                                             before_update=lambda: _notify(callbacks, "on_gradients", step + 1, raw))
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise TrainingDiverged(_diverged_message(step, loss, grad_norm, lr, ckpt_path))
            done = step + 1
            if config.check_replicas:
                check_replicas(model, done)
            if sampler is not None:
                run.tokens += sum(tokens.numel() for tokens, *_ in micro_batches)
            info = _record_step(run, done, schedule, loss, lr, grad_norm, raw, eval_fn, config)
            _notify(callbacks, "on_step", done, info)
            _show_progress(bar, info)
            if ckpt_path is not None and is_main and _checkpoint_due(config, done, schedule):
                elapsed = run.train_seconds + time.perf_counter() - t0
                _save_checkpoint(ckpt_path, optimizer, named, config, done, schedule, elapsed, run.history, sampler,
                                 world)
    finally:
        if bar is not None:
            bar.close()
    run.train_seconds += time.perf_counter() - t0

    if eval_fn is not None and (not run.history["eval"] or run.history["eval"][-1]["step"] != schedule.total_steps):
        run.history["eval"].append(_run_eval(raw, eval_fn, schedule.total_steps))
    metrics = _final_metrics(run, schedule, config, model, raw, named, train_data, world)
    _notify(callbacks, "on_end", metrics)
    if out_dir is not None and is_main:
        write_metrics(out_dir, metrics, update=False)  # a new file: nothing left from an older run
    return metrics


# --------------------------------------------------------------------------- set-up
def _wrap_for(model: nn.Module, world: int) -> nn.Module:
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameter (requires_grad=True); attach an adapter or unfreeze it")
    if world > 1 and strategy_of(model) == "none":
        return wrap_model(model, "ddp")  # the ranks' gradients must be averaged
    return model


def _check_objective(batch_fn: Optional[Callable], loss_fn: Optional[Callable], config: TrainConfig,
                     world: int) -> None:
    if (batch_fn is None) != (loss_fn is None):
        raise ValueError("train(): give batch_fn and loss_fn together (another objective), or neither "
                         "(next-token cross-entropy on a TokenDataset)")
    if batch_fn is not None and config.micro_batch_size is not None:
        raise ValueError("train(): a batch_fn gives whole batches; set TrainConfig.micro_batch_size=None")
    if batch_fn is not None and world > 1:
        raise ValueError(f"train(): a batch_fn runs in one process, this is one of {world}; "
                         "under torchrun train on a TokenDataset")


def _batches(data: TokenDataset | Sized, config: TrainConfig, device: torch.device, rank: int, world: int,
             batch_fn: Optional[Callable[[int], Any]]) -> tuple[Optional[StepSampler], Callable[[int], list]]:
    """-> (the sampler of a TokenDataset or None, step -> this rank's micro-batches of the step).
    A TokenDataset's micro-batch: (tokens, labels, forward_args, n_targets), n_targets counting the
    labelled tokens of the whole global batch (:func:`token_loss`); a batch_fn's batch is one."""
    if batch_fn is not None:
        return None, lambda step: [batch_fn(step)]
    sampler = StepSampler(data.lengths, config.batch_size, config.seed, rank, world, config.micro_batch_size,
                          group=config.length_group)

    def batches(step: int) -> list[tuple]:
        n_targets = max(1, data.n_targets(sampler.global_batch(step)))
        return [(*get_batch(data, part, device), n_targets) for part in sampler.micro_batches(step)]

    return sampler, batches


def _prepare_out_dir(config: TrainConfig, is_main: bool) -> Optional[Path]:
    out_dir = Path(config.out_dir) if config.out_dir else None
    if out_dir is not None and is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out_dir, older_than_s=0)  # one run per folder: any temp file is a killed run's
    return out_dir


def _progress_bar(config: TrainConfig, schedule: Schedule, start_step: int):
    if not config.progress:
        return None
    return progress_bar(total=schedule.total_steps, initial=start_step, desc=config.desc, unit="step")


def _show_progress(bar, info: dict) -> None:
    if bar is not None:
        if info["log"]:
            bar.set_postfix(loss=f"{info['loss']:.4f}", lr=f"{info['lr']:.2e}", refresh=False)
        bar.update(1)


# --------------------------------------------------------------------------- after each step, at the end
def _record_step(run: RunState, done: int, schedule: Schedule, loss: float, lr: float, grad_norm: float,
                 raw: nn.Module, eval_fn: Optional[Callable], config: TrainConfig) -> dict:
    """Log the loss every log_every steps, evaluate every eval_every steps; -> the callbacks' info."""
    log_now = done % config.log_every == 0 or done == schedule.total_steps
    if log_now:
        run.history["loss"].append([done, loss])
    eval_result = None
    if eval_fn is not None and config.eval_every and done % config.eval_every == 0 and done != schedule.total_steps:
        eval_result = _run_eval(raw, eval_fn, done)
        run.history["eval"].append(eval_result)
    return {"step": done, "total_steps": schedule.total_steps, "epoch": done / schedule.steps_per_epoch,
            "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": run.tokens, "eval": eval_result,
            "model": raw, "log": log_now}


def _run_eval(model: nn.Module, eval_fn: Callable, step: int) -> dict:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        result = eval_fn(model)
    model.train(was_training)
    if not isinstance(result, dict):
        result = {"eval": float(result)}
    return {"step": step, **result}


def _final_metrics(run: RunState, schedule: Schedule, config: TrainConfig, model: nn.Module, raw: nn.Module,
                   named: Sequence[tuple[str, nn.Parameter]], train_data: TokenDataset | Sized, world: int) -> dict:
    metrics = {
        "steps": schedule.total_steps,
        "epochs": schedule.total_steps / schedule.steps_per_epoch,
        "steps_per_epoch": schedule.steps_per_epoch,
        "batch_size": config.batch_size,
        "lr": config.peak_lr,
        "final_loss": run.last_loss,
        "loss_history": run.history["loss"],
        "eval_history": run.history["eval"],
        "train_seconds": round(run.train_seconds, 2),
        "trainable_params": sum(p.numel() for _, p in named),
        "total_params": sum(p.numel() for p in raw.parameters()),
        "world_size": world,
        "strategy": strategy_of(model),
        "all_reduced_elements": reduced_elements(model)["elements"] if world > 1 else 0,
        "examples": len(train_data),
        "truncated_examples": getattr(train_data, "n_truncated", 0),
        "resumed_from_step": run.start_step if run.resumed else None,
        "config": config.to_dict(),
    }
    if run.history["eval"]:
        metrics["eval"] = run.history["eval"][-1]
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


def _diverged_message(step: int, loss: float, grad_norm: float, lr: float, ckpt: Optional[Path]) -> str:
    where = (f"The last good checkpoint is kept at {ckpt} (resume with --resume)."
             if ckpt is not None and ckpt.is_file() else "No checkpoint was written before this step.")
    return (f"training diverged at step {step + 1}: loss={loss}, gradient norm={grad_norm} (lr={lr:.3g}). "
            f"The update was not applied. {where} Try a lower learning rate (--lr/--blr) or gradient clipping.")


def _resume_hint(ckpt: Optional[Path]) -> str:
    if ckpt is not None and ckpt.is_file():
        return f"The last checkpoint {ckpt} is intact: rerun with --resume (any number of processes)."
    return ""


# --------------------------------------------------------------------------- checkpoints and resume
def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a training checkpoint (tensors and plain values only: ``weights_only=True``)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _checkpoint_due(config: TrainConfig, done: int, schedule: Schedule) -> bool:
    return config.checkpoint and bool((config.ckpt_every and done % config.ckpt_every == 0)
                                      or done == schedule.total_steps)


def _save_checkpoint(path: Path, optimizer, named, config: TrainConfig, step: int, schedule: Schedule,
                     train_seconds: float, history: dict, sampler: Optional[StepSampler], world: int) -> None:
    """Everything a resumed run needs, nothing that depends on the number of processes (the data
    position is the global step; ``world_size`` is recorded for information only)."""
    atomic_torch_save({
        "step": step,
        "trainable": {n: p.detach().cpu().clone() for n, p in named},
        "optimizer": optimizer.state_dict(),
        "scheduler": {"step": step, "total_steps": schedule.total_steps, "warmup_steps": schedule.warmup_steps},
        "data_position": sampler.position(step) if sampler is not None else {"global_step": step},
        "world_size": world,
        "rng": _rng_state(),
        "config": {k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool, type(None)))},
        "train_seconds": train_seconds,
        "history": history,
    }, path)


def _resume(model: nn.Module, optimizer, named, config: TrainConfig, path: Optional[Path], is_main: bool) -> RunState:
    """A fresh RunState, or the one saved in ``path`` with the tensors, optimizer and RNG restored."""
    if not config.resume:
        return RunState()
    if path is None or not path.is_file():
        if is_main:
            where = path.parent if path is not None else None
            print(f"[{config.desc}] --resume: no checkpoint in {where}, starting from step 0")
        return RunState()
    ckpt = load_checkpoint(path)
    _check_resumable(ckpt, named, config, path)
    with torch.no_grad():
        for n, p in named:
            p.copy_(ckpt["trainable"][n].to(p.device, p.dtype))
    optimizer.load_state_dict(ckpt["optimizer"])
    _set_rng_state(ckpt["rng"])
    return RunState(start_step=ckpt["step"], train_seconds=ckpt["train_seconds"], history=ckpt["history"],
                    resumed=True)


def _check_resumable(ckpt: dict, named, config: TrainConfig, path: Path) -> None:
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


# --------------------------------------------------------------------------- speed: opt-in torch.compile
def compile_model(model: nn.Module, *, mode: Optional[str] = None, fallback: bool = True) -> nn.Module:
    """Compile every transformer block of an adapterlab ``Llama`` with ``torch.compile``, in place.

    Blocks are compiled one by one ("regional compilation"): all blocks share one compiled
    graph per situation (frozen block without autograd, adapted block with autograd), so it
    compiles in seconds to a minute instead of unrolling the whole network. Parameter names and
    ``state_dict`` stay unchanged. Only full-sequence calls (training, evaluation) use the
    compiled code; calls with a ``KVCache`` (generation) stay eager, which avoids a
    recompilation at every new position.

    fallback: if compiling or running a compiled block raises (no C compiler, no Triton, an
    unsupported operation), warn once, return the block to eager code and go on. Errors in the
    backward pass of a compiled block are not caught here. ``uncompile_model`` undoes this.
    """
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ValueError("compile_model expects an adapterlab Llama (a model with .layers)")
    if not hasattr(torch, "compile"):
        warnings.warn("compile_model: this torch has no torch.compile; the model stays eager")
        return model
    uncompile_model(model)  # compiling twice would wrap the wrapper
    state = {"failed": False}
    for layer in layers:
        layer.forward = _compiled_forward(layer, torch.compile(layer.forward, mode=mode), state, fallback)
    model.compiled = True
    return model


def uncompile_model(model: nn.Module) -> nn.Module:
    """Undo ``compile_model``: every block runs its ordinary eager ``forward`` again."""
    for layer in getattr(model, "layers", []):
        if "forward" in layer.__dict__:
            del layer.forward  # the instance attribute hid the class's forward
    model.compiled = False
    return model


def _compile_errors() -> tuple[type, ...]:
    """The exception types torch.compile raises when it cannot compile (missing compiler, Triton, ...).
    Only these trigger the fallback: other exceptions (wrong input shapes, the control-flow exception
    of activation checkpointing's recomputation) must pass through unchanged."""
    found = []
    for module, name in (("torch._dynamo.exc", "TorchDynamoException"), ("torch._inductor.exc", "InductorError")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _compiled_forward(layer: nn.Module, compiled, state: dict, fallback: bool):
    eager = type(layer).forward.__get__(layer)
    compile_errors = _compile_errors()

    def forward(x, cos, sin, start_pos: int = 0, cache=None, visual=None):
        if cache is not None or state["failed"]:
            return eager(x, cos, sin, start_pos, cache, visual)
        try:
            return compiled(x, cos, sin, start_pos, cache, visual)
        except compile_errors as error:  # compilation problems surface at the first call
            if not fallback:
                raise
            state["failed"] = True
            warnings.warn(f"compile_model: torch.compile failed ({type(error).__name__}: {error}); running eager")
            return eager(x, cos, sin, start_pos, cache, visual)

    return forward


__all__ = [
    "TrainConfig", "Schedule", "lr_at", "train", "train_step", "token_loss", "make_optimizer", "RunState", "Callback",
    "TrainingDiverged", "CheckpointMismatch", "load_checkpoint", "write_metrics", "compile_model", "uncompile_model",
    "CHECKPOINT_NAME", "METRICS_NAME",
]
