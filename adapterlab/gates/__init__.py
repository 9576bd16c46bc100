"""Watching the gates open: record tanh(g) during training, read the log back, draw it.

Layer 4 (beside losses and generate): imports files and adapter. The training loop
(:mod:`adapterlab.train`) attaches a :class:`GateRecorder` to every run with an adapter and an
output folder; matplotlib and ipywidgets are imported only when a picture is drawn.

Every zero-init gate starts at 0 (Eq. 7), so at step 0 the adapted model is the frozen model.
:class:`GateRecorder` appends one JSON line per logged step to ``DIR/gates.jsonl``::

    {"step": 120, "epoch": 1.5, "loss": 0.83, "lr": 0.0061, "layers": [2, 3], "gates": [[...H...], [...H...]]}

``gates`` holds the *effective* gate (tanh(g) for the paper's gate, g for an identity gate),
one row per adapted layer (bottom first), one value per head. The first line (step 0) is
written before training, with ``"loss": null``.

The recorder of :func:`adapterlab.train.train` (``details=True``, the default) adds what a study
of the gates' dynamics needs, each an (L, H) array like ``gates`` (7 significant digits;
a per-layer gate is repeated over the heads)::

    "raw":          g itself, before the activation (what the optimizer moves)
    "grad":         dL/dg of this step's batch: complete (all micro-batches and ranks), before
                    clipping and before the update (null at the first record)
    "prompt_norm":  per head h: the root mean square over the K prompts of |P_v^h|, the length of
                    a prompt's value vector in head h (the prompts through the frozen W_v)
    "prompt_share": per head h: the mean over the positions of this step's batch (padding, id 0,
                    left out) of  a / (a + b),  with  a = |g softmax(Q P_k^T / sqrt d) P_v|  the
                    length of the gated prompt term of Eq. 7 at that position and  b = |softmax(S^{M+1}) V|
                    the token term's: the share of the head's output (before W_o) that comes from
                    the prompts. 0 while the gate is closed; 1/2 when both terms are as long.
                    Measured in the forward pass of this step, so with the gates *before* its
                    update (null at the first record)
    "lr_sum":       the sum of the learning rates of every update so far (a number)

The mass of the prompt block itself is not worth a field: each of its rows sums to the gate
(the prompts' softmax sums to 1), so it is ``gates``. The share above also counts how long the
prompts' values are against the tokens' values. Under torchrun the share is rank 0's part of the
batch. The details are measured on logged steps only; their cost was below the noise of a
measurement on the tiny world even with every step logged (CPU time per step within +-3%).
A log without these fields (an older run, or ``GateRecorder(details=False)``) reads the same;
:class:`GateLog` then has ``None`` for them. :func:`ablate_heads` closes one head's gate at a
time and measures what that costs (e.g. the held-out loss).

Pictures: :func:`plot_heatmap` (layer x step), :func:`plot_head_curves` (heads of one layer),
:func:`plot_final_bars` (per-layer at the end), :func:`plot_summary` (all of them, loss beside
the gates; saved as gates.png at the end of every run), :func:`plot_runs` (several runs on one
plot, against the step or the summed learning rate), :class:`LivePlot` (redraws in a notebook
while training) and :func:`explorer` (ipywidgets: step slider, layer, head and quantity pickers;
one run or several overlaid).
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..adapter import adapted_layers, gate_values
from ..io.files import atomic_write_text

GATES_NAME = "gates.jsonl"
PLOT_NAME = "gates.png"
DETAILS = ("raw", "grad", "prompt_norm", "prompt_share")  # the (L, H) fields besides "gates"
QUANTITIES = ("gates",) + DETAILS
PAD_ID = 0  # what adapterlab.data.collate pads with (LLaMA's <unk>): left out of the prompt share


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    try:
        ip = shell.get_ipython()
    except Exception:
        return False
    return ip is not None and "IPKernelApp" in getattr(ip, "config", {})


def pyplot():
    """matplotlib.pyplot, with the Agg (file-only) backend unless we are inside a notebook."""
    import matplotlib

    if not _in_notebook() and "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------- recording
def gated_layers(model) -> list[int]:
    """The adapted layers whose adapter has a gate, bottom first (an ungated adapter,
    ``AdapterConfig(gate="none")``, has nothing to record: its prompts share the tokens' softmax)."""
    return [i for i in adapted_layers(model) if model.layers[i].attention.adapter.gate is not None]


def gate_record(model, step: int, epoch: float, loss: Optional[float], lr: float) -> dict:
    """One log line: the model's effective gates now, with the step's loss and learning rate.
    ``layers`` names the gated layers only, so it matches the rows of ``gates``."""
    return {
        "step": int(step),
        "epoch": round(float(epoch), 6),
        "loss": None if loss is None else float(loss),
        "lr": float(lr),
        "layers": gated_layers(model),
        "gates": gate_values(model).tolist(),  # (L gated, H)
    }


def _rounded(rows) -> list:
    """A nested list of floats at 7 significant digits (float32 precision; smaller files)."""
    if isinstance(rows, (list, tuple)):
        return [_rounded(r) for r in rows]
    return float(f"{rows:.7g}")


def _per_head(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """A gate-shaped tensor ((1, H, 1, 1) per head or (1,) per layer) -> (H,)."""
    x = x.detach().float().reshape(-1)
    return x.expand(n_heads) if x.numel() == 1 else x


@torch.no_grad()
def prompt_value_norms(model) -> torch.Tensor:
    """Per gated layer and head: RMS over the K prompts of the length of each prompt's value vector
    in that head (the prompts through the layer's frozen W_v, no image token) -> (L, H)."""
    rows = []
    for i in gated_layers(model):
        attn = model.layers[i].attention
        _, pv = attn.adapter.prompt_kv(attn)  # (1, H_kv, K, d)
        norms = pv[0].float().norm(dim=-1).pow(2).mean(-1).sqrt()  # (H_kv,)
        rows.append(norms.repeat_interleave(attn.n_heads // attn.n_kv_heads))
    return torch.stack(rows) if rows else torch.zeros(0, model.config.n_heads)


def gate_details(model) -> dict:
    """The fields of a record that the model's state alone gives: raw g and the prompt norms."""
    H = model.config.n_heads
    raw = [_per_head(model.layers[i].attention.adapter.gate, H) for i in gated_layers(model)]
    return {"raw": _rounded(torch.stack(raw).tolist()) if raw else [],
            "prompt_norm": _rounded(prompt_value_norms(model).tolist())}


def gate_gradients(model) -> Optional[list]:
    """dL/dg of every gated layer as (L, H) rows, or None when a gate has no gradient."""
    H = model.config.n_heads
    grads = [model.layers[i].attention.adapter.gate.grad for i in gated_layers(model)]
    if not grads or any(g is None for g in grads):
        return None
    return _rounded(torch.stack([_per_head(g, H) for g in grads]).tolist())


class PromptShareMeter:
    """While attached, measures the prompts' share of every gated head's output (``prompt_share``
    in the module docstring) in the forward passes that track gradients (training, not evaluation).

    Forward hooks on each gated adapter (its output is the gated prompt term; the token term comes
    in as ``token_out``) and on the token embedding (to leave padding out).
    """

    def __init__(self, model):
        self.layers = gated_layers(model)
        self.sums = torch.zeros(len(self.layers), model.config.n_heads, dtype=torch.float64)
        self.counts = torch.zeros(len(self.layers), 1, dtype=torch.float64)
        self._mask: Optional[torch.Tensor] = None
        self._hooks = []
        embed = getattr(model, "tok_embeddings", None)
        if embed is not None:
            self._hooks.append(embed.register_forward_pre_hook(self._tokens))
        for row, i in enumerate(self.layers):
            hook = lambda module, args, kwargs, out, row=row: self._measure(row, out, kwargs)  # noqa: E731
            self._hooks.append(model.layers[i].attention.adapter.register_forward_hook(hook, with_kwargs=True))

    def _tokens(self, module, args) -> None:
        if torch.is_grad_enabled():
            self._mask = (args[0] != PAD_ID).detach()  # (B, T)

    def _measure(self, row: int, prompt_term: torch.Tensor, kwargs: dict) -> None:
        token_term = kwargs.get("token_out")
        if torch.is_grad_enabled() and token_term is not None:  # a training forward pass
            with torch.no_grad():
                self._add(row, prompt_term, token_term)

    def _add(self, row: int, prompt_term: torch.Tensor, token_term: torch.Tensor) -> None:
        a = prompt_term.detach().float().norm(dim=-1)  # (B, H, T)
        b = token_term.detach().float().norm(dim=-1)
        share = a / (a + b).clamp_min(1e-30)
        B, _, T = share.shape
        mask = self._mask if self._mask is not None and self._mask.shape == (B, T) else None
        if mask is None:
            mask = torch.ones(B, T, dtype=torch.bool, device=share.device)
        w = mask[:, None, :].to(share.dtype)  # (B, 1, T)
        self.sums[row] += (share * w).sum(dim=(0, 2)).double().cpu()
        self.counts[row] += w.sum().double().cpu()

    def result(self) -> Optional[list]:
        """The mean share per (layer, head) over the positions seen, or None if none was seen."""
        if not bool((self.counts > 0).all()):
            return None
        return _rounded((self.sums / self.counts).tolist())

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


@torch.no_grad()
def ablate_heads(model, metric) -> tuple[float, np.ndarray]:
    """Close one head's gate at a time (g = 0, so its prompts add nothing) and measure.

    metric(model) -> float, e.g. the held-out loss. Returns (metric with every gate as trained,
    (L, H) metric with the gate of that gated layer and head set to 0). The gates are restored
    afterwards. Needs per-head gates (``AdapterConfig(gate="head")``).
    """
    layers = gated_layers(model)
    if not layers:
        require_gates(model, "ablate_heads")
    gate_params = [model.layers[i].attention.adapter.gate for i in layers]
    if any(g.numel() == 1 for g in gate_params):
        raise ValueError("ablate_heads: this adapter has one gate per layer (AdapterConfig(gate='layer')); "
                         "closing one head needs gate='head'")
    base = float(metric(model))
    result = np.zeros((len(layers), gate_params[0].numel()))
    for row, g in enumerate(gate_params):
        for h in range(g.numel()):
            kept = g.view(-1)[h].item()
            g.view(-1)[h] = 0.0
            try:
                result[row, h] = float(metric(model))
            finally:
                g.view(-1)[h] = kept
    return base, result


def require_gates(model, who: str) -> None:
    """A clear error instead of a log of empty rows when the model has no gate to record."""
    if not gated_layers(model):
        layers = adapted_layers(model)
        what = (f"its adapter (layers {layers}) is ungated (AdapterConfig(gate='none'))" if layers
                else "it carries no adapter")
        raise ValueError(f"{who}: the model has no gate to record - {what}. Drop the callback; "
                         "train() attaches a GateRecorder only to gated adapters.")


def start_record(state: dict) -> dict:
    """The gate record of the step a run starts from (0, or a resumed run's checkpoint step), with
    the epoch and learning rate the run has there (``state``: what train() passes to on_start;
    another caller that gives no epoch or lr gets 0.0)."""
    return gate_record(state["model"], state["start_step"], state.get("epoch", 0.0), None, state.get("lr", 0.0))


class GateRecorder:
    """Append a gate record to ``DIR/gates.jsonl`` every ``every`` steps; draw ``gates.png`` at the end.

    A training callback (on_start / on_gradients / on_step / on_end, see
    :class:`adapterlab.train.Callback`); :func:`adapterlab.train.train` adds one by itself to a run
    with an adapter and an ``out_dir``. ``details`` (default): also raw g, its gradient, the prompt
    norms, the prompts' share of each head's output and the summed learning rate (module
    docstring). They are measured only on the steps that are logged: the share by forward hooks
    attached for that step's forward pass, the gradient just before that step's update.

    On a resumed run, lines written after the checkpoint's step are dropped first, so the log of
    a run killed and resumed is identical to an uninterrupted one.
    """

    def __init__(self, out_dir: str | os.PathLike, every: int = 10, plot: bool = True, details: bool = True):
        self.dir = Path(out_dir)
        self.path = self.dir / GATES_NAME
        self.every = every
        self.plot = plot
        self.details = details
        self.total_steps: Optional[int] = None
        self.lr_sum: Optional[float] = 0.0
        self._grad: Optional[list] = None
        self._meter: Optional[PromptShareMeter] = None

    def _due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total_steps

    def on_start(self, state: dict) -> None:
        require_gates(state["model"], "GateRecorder")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.total_steps = state["total_steps"]
        self.lr_sum = state.get("lr_sum", 0.0 if state["start_step"] == 0 else None)  # (train() gives it)
        if state["resumed"]:
            kept = [r for r in read_gates(self.path, missing_ok=True) if r["step"] <= state["start_step"]]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        else:
            atomic_write_text(self.path, json.dumps(self._record(start_record(state), state["model"])) + "\n")
        self._arm(state["model"], state["start_step"] + 1)

    def _arm(self, model, next_step: int) -> None:
        """Attach the share meter for the forward pass of ``next_step`` if that step is logged."""
        if self.details and self._meter is None and next_step <= self.total_steps and self._due(next_step):
            self._meter = PromptShareMeter(model)

    def _record(self, record: dict, model) -> dict:
        if not self.details:
            return record
        share = None
        if self._meter is not None:
            share = self._meter.result()
            self._meter.remove()
            self._meter = None
        details = gate_details(model)
        record.update({"raw": details["raw"], "grad": self._grad, "prompt_norm": details["prompt_norm"],
                       "prompt_share": share, "lr_sum": None if self.lr_sum is None else float(f"{self.lr_sum:.9g}")})
        self._grad = None
        return record

    def on_gradients(self, step: int, model) -> None:
        if self.details and self._due(step):
            self._grad = gate_gradients(model)

    def on_step(self, step: int, info: dict) -> None:
        if self.lr_sum is not None:
            self.lr_sum += info["lr"]
        if self._due(step) or step == info["total_steps"]:
            record = gate_record(info["model"], step, info["epoch"], info["loss"], info["lr"])
            line = json.dumps(self._record(record, info["model"]))
            with open(self.path, "a") as f:
                f.write(line + "\n")
                f.flush()
        self._arm(info["model"], step + 1)

    def on_end(self, info: dict) -> None:
        if self._meter is not None:
            self._meter.remove()
            self._meter = None
        if self.plot:
            save_plot(self.path, self.dir / PLOT_NAME)


# --------------------------------------------------------------------------- reading
def read_gates(path: str | os.PathLike, missing_ok: bool = False) -> list[dict]:
    """The records of a gates.jsonl file (or of DIR/gates.jsonl). A torn last line (a run killed
    while writing) is skipped; any other bad line is an error naming the file and line."""
    path = Path(path)
    if path.is_dir():
        path = path / GATES_NAME
    if not path.is_file():
        if missing_ok:
            return []
        raise FileNotFoundError(f"{path}: no gate log here; pass a run folder with gates.jsonl or the file itself")
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # torn write at the end
            raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
        for key in ("step", "layers", "gates"):
            if key not in rec:
                raise ValueError(f"{path}: line {i + 1} has no {key!r}; is this a gates.jsonl written by adapterlab?")
        records.append(rec)
    return records


@dataclass
class GateLog:
    """A gate log as arrays: steps (S,), gates (S, L, H), loss (S,) with NaN where absent, lr (S,).

    When the records have them (module docstring): raw, grad, prompt_norm, prompt_share as
    (S, L, H) arrays (NaN in a record that lacks a value, e.g. the gradient at step 0) and lr_sum
    (S,); otherwise these are None (a log written without details, or by an older version).
    """

    steps: np.ndarray
    gates: np.ndarray
    loss: np.ndarray
    lr: np.ndarray
    layers: list[int]
    raw: Optional[np.ndarray] = None
    grad: Optional[np.ndarray] = None
    prompt_norm: Optional[np.ndarray] = None
    prompt_share: Optional[np.ndarray] = None
    lr_sum: Optional[np.ndarray] = None

    @classmethod
    def from_records(cls, records: Sequence[dict]) -> "GateLog":
        if not records:
            raise ValueError("the gate log is empty")
        gates = np.array([r["gates"] for r in records], dtype=np.float64)
        details = {name: _field(records, name, gates.shape[1:]) for name in DETAILS}
        lr_sum = None
        if any(r.get("lr_sum") is not None for r in records):
            lr_sum = np.array([np.nan if r.get("lr_sum") is None else r["lr_sum"] for r in records], dtype=np.float64)
        return cls(
            steps=np.array([r["step"] for r in records]),
            gates=gates,
            loss=np.array([np.nan if r.get("loss") is None else r["loss"] for r in records], dtype=np.float64),
            lr=np.array([r.get("lr", np.nan) for r in records], dtype=np.float64),
            layers=list(records[-1]["layers"]),
            lr_sum=lr_sum,
            **details,
        )

    @classmethod
    def read(cls, path: str | os.PathLike) -> "GateLog":
        return cls.from_records(read_gates(path))

    def quantity(self, name: str) -> np.ndarray:
        """One of :data:`QUANTITIES` as (S, L, H); an error naming what the log has if it is absent."""
        if name not in QUANTITIES:
            raise ValueError(f"unknown gate-log quantity {name!r}; choose one of {QUANTITIES}")
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"this gate log has no {name!r} (recorded without details, or by an older version); "
                             f"it has {self.available()}")
        return value

    def available(self) -> list[str]:
        """The quantities this log has, "gates" first."""
        return [q for q in QUANTITIES if getattr(self, q) is not None]

    def cumulative_lr(self) -> np.ndarray:
        """The sum of the learning rates of every update up to each record (S,): ``lr_sum`` when
        recorded; otherwise from the logged rates, each standing for the steps since the record
        before it (exact when every step is logged)."""
        if self.lr_sum is not None and np.isfinite(self.lr_sum).all():
            return self.lr_sum
        gaps = np.diff(self.steps, prepend=self.steps[0]).astype(np.float64)
        return np.cumsum(np.nan_to_num(self.lr) * gaps)


def _field(records: Sequence[dict], name: str, shape: tuple) -> Optional[np.ndarray]:
    """The (S, L, H) array of one detail field, NaN where a record has none; None if no record has it."""
    if not any(r.get(name) is not None for r in records):
        return None
    nan = np.full(shape, np.nan)
    return np.array([nan if r.get(name) is None else np.asarray(r[name], dtype=np.float64).reshape(shape)
                     for r in records], dtype=np.float64)


def _as_log(source) -> GateLog:
    if isinstance(source, GateLog):
        return source
    if isinstance(source, (list, tuple)):
        return GateLog.from_records(source)
    return GateLog.read(source)


def summarize(source) -> dict:
    """Numbers that describe a gate log: per-layer mean |gate| at the start and the end, largest head."""
    log = _as_log(source)
    first, last = log.gates[0], log.gates[-1]  # (L, H)
    per_layer = []
    for i, layer in enumerate(log.layers):
        head = int(np.abs(last[i]).argmax())
        per_layer.append({"layer": layer, "start_mean_abs": float(np.abs(first[i]).mean()),
                          "end_mean_abs": float(np.abs(last[i]).mean()), "end_max_head": head,
                          "end_max_value": float(last[i, head])})
    finite = log.loss[np.isfinite(log.loss)]
    return {"records": len(log.steps), "first_step": int(log.steps[0]), "last_step": int(log.steps[-1]),
            "layers": per_layer, "first_loss": float(finite[0]) if finite.size else None,
            "last_loss": float(finite[-1]) if finite.size else None}


def format_summary(summary: dict) -> str:
    lines = [f"{summary['records']} records, steps {summary['first_step']}..{summary['last_step']}"]
    if summary["first_loss"] is not None:
        lines[0] += f", loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}"
    lines.append("layer   mean|gate| start -> end   largest head (value)")
    for row in summary["layers"]:
        lines.append(f"{row['layer']:>5}   {row['start_mean_abs']:10.4f} -> {row['end_mean_abs']:.4f}"
                     f"   head {row['end_max_head']} ({row['end_max_value']:+.4f})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots
# One colour code in every picture: heads in distinct colours (a qualitative palette with no blue),
# layers in shades of blue (light = lower layer, dark = higher), the loss in black.
def head_colors(n_heads: int) -> list:
    """A colour per head (Dark2, repeated past 8 heads)."""
    plt = pyplot()
    palette = plt.colormaps["Dark2"].colors
    return [palette[h % len(palette)] for h in range(n_heads)]


def layer_colors(n_layers: int) -> list:
    """A shade of blue per adapted layer, from light (the lowest) to dark (the highest)."""
    plt = pyplot()
    return [plt.colormaps["Blues"](x) for x in np.linspace(0.45, 0.95, n_layers)]


def plot_heatmap(source, ax=None, reduce: str = "mean_abs"):
    """Layer x step picture of the gates (mean |gate| over heads, or one head with reduce=int)."""
    plt = pyplot()
    log = _as_log(source)
    ax = ax or plt.figure(figsize=(6, 3)).gca()
    data = np.abs(log.gates).mean(-1) if reduce == "mean_abs" else log.gates[:, :, int(reduce)]  # (S, L)
    steps = log.steps.astype(float)
    if len(steps) > 1:  # cell edges halfway between logged steps
        mids = (steps[1:] + steps[:-1]) / 2
        x_edges = np.concatenate([[steps[0]], mids, [steps[-1]]])
    else:
        x_edges = np.array([steps[0] - 0.5, steps[0] + 0.5])
    y_edges = np.arange(len(log.layers) + 1) - 0.5
    im = ax.pcolormesh(x_edges, y_edges, data.T, cmap="viridis", shading="flat")
    ax.set_yticks(np.arange(len(log.layers)), [str(l) for l in log.layers])
    ax.set_xlabel("step")
    ax.set_ylabel("adapted layer")
    ax.set_title("gate opening, mean |tanh(g)| over heads" if reduce == "mean_abs" else f"gate of head {reduce}")
    ax.figure.colorbar(im, ax=ax, fraction=0.05)
    return ax


def plot_head_curves(source, layer: Optional[int] = None, ax=None, heads: Optional[Sequence[int]] = None):
    """The gate of every head of one adapted layer (default: the top one) against the step."""
    plt = pyplot()
    log = _as_log(source)
    layer = log.layers[-1] if layer is None else layer
    if layer not in log.layers:
        raise ValueError(f"layer {layer} has no adapter; adapted layers are {log.layers}")
    i = log.layers.index(layer)
    ax = ax or plt.figure(figsize=(5, 3)).gca()
    colors = head_colors(log.gates.shape[2])
    for h in (range(log.gates.shape[2]) if heads is None else heads):
        ax.plot(log.steps, log.gates[:, i, h], color=colors[h], label=f"head {h}")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("gate")
    ax.set_title(f"layer {layer}: gate per head (colour = head)")
    if log.gates.shape[2] <= 8:
        ax.legend(fontsize="small")
    return ax


def plot_final_bars(source, ax=None, step_index: int = -1):
    """Mean |gate| per adapted layer at one logged step (default: the last), with the head range."""
    plt = pyplot()
    log = _as_log(source)
    ax = ax or plt.figure(figsize=(4, 3)).gca()
    g = np.abs(log.gates[step_index])  # (L, H)
    x = np.arange(len(log.layers))
    ax.bar(x, g.mean(-1), color=layer_colors(len(log.layers)), label="mean over heads")
    ax.scatter(np.repeat(x, g.shape[1]), g.reshape(-1), color="black", s=6, label="each head")
    ax.set_xticks(x, [str(l) for l in log.layers])
    ax.set_xlabel("adapted layer")
    ax.set_ylabel("|gate|")
    ax.set_title(f"gates at step {int(log.steps[step_index])}")
    ax.legend(fontsize="small")
    return ax


def plot_loss_and_gates(source, ax=None):
    """Training loss (left axis) beside the mean |gate| of every layer (right axis)."""
    plt = pyplot()
    log = _as_log(source)
    ax = ax or plt.figure(figsize=(5, 3)).gca()
    ok = np.isfinite(log.loss)
    loss_line = ax.plot(log.steps[ok], log.loss[ok], color="black", lw=2, label="loss (left axis)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    mean_abs = np.abs(log.gates).mean(-1)  # (S, L)
    for i, (layer, color) in enumerate(zip(log.layers, layer_colors(len(log.layers)))):
        ax2.plot(log.steps, mean_abs[:, i], lw=1.5, color=color, label=f"layer {layer}")
    ax2.set_ylabel("mean |gate| (blue, darker = higher layer)")
    handles = loss_line + (ax2.get_lines() if len(log.layers) <= 8 else [])
    ax2.legend(handles, [h.get_label() for h in handles], fontsize="small", loc="center right")
    ax.set_title("training loss and mean |gate| per layer")
    return ax


def plot_summary(source, layer: Optional[int] = None, fig=None):
    """The four pictures in one figure (what gates.png shows)."""
    plt = pyplot()
    log = _as_log(source)
    fig = fig or plt.figure(figsize=(11, 7))
    fig.clf()
    axes = fig.subplots(2, 2)
    plot_heatmap(log, axes[0, 0])
    plot_head_curves(log, layer, axes[0, 1])
    plot_final_bars(log, axes[1, 0])
    plot_loss_and_gates(log, axes[1, 1])
    fig.tight_layout()
    return fig


def save_plot(source, out_path: str | os.PathLike) -> Path:
    """Draw :func:`plot_summary` of a log into a PNG file."""
    plt = pyplot()
    fig = plot_summary(source)
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path


# --------------------------------------------------------------------------- notebooks
class LivePlot:
    """A training callback that redraws the gate pictures in a notebook every ``every`` steps.

    Usage: ``train(model, data, config, callbacks=[LivePlot(every=20)])``. Outside a notebook it
    keeps the records (``.records``) and draws nothing.
    """

    def __init__(self, every: int = 20, layer: Optional[int] = None):
        self.every = every
        self.layer = layer
        self.records: list[dict] = []
        self._handle = None
        self._fig = None

    def on_start(self, state: dict) -> None:
        require_gates(state["model"], "LivePlot")
        self.records = [start_record(state)]  # a resumed run starts at its own step, epoch and lr
        self._draw()

    def on_step(self, step: int, info: dict) -> None:
        if step % self.every == 0 or step == info["total_steps"]:
            self.records.append(gate_record(info["model"], step, info["epoch"], info["loss"], info["lr"]))
            self._draw()

    def _draw(self) -> None:
        if not _in_notebook():
            return
        from IPython.display import display

        plt = pyplot()
        if self._fig is None:
            self._fig = plt.figure(figsize=(11, 7))
            plt.close(self._fig)  # we display it ourselves, not at the end of the cell
        plot_summary(self.records, self.layer, fig=self._fig)
        if self._handle is None:
            self._handle = display(self._fig, display_id=True)
        else:
            self._handle.update(self._fig)


# --------------------------------------------------------------------------- several runs
QUANTITY_LABELS = {"gates": "gate", "raw": "raw g", "grad": "dL/dg", "prompt_norm": "prompt value norm",
                   "prompt_share": "prompts' share of the output"}


def as_runs(source, labels: Optional[Sequence[str]] = None) -> dict[str, GateLog]:
    """One log or several -> {label: GateLog}. source: a run folder, a gates.jsonl, a GateLog or a
    list of records (one run); a dict {label: one of those}; or a list of folders/files/GateLogs
    (labels: the names to show, default the folder names or run 0, 1, ...)."""
    if isinstance(source, dict):
        return {str(k): _as_log(v) for k, v in source.items()}
    several = isinstance(source, (list, tuple)) and source and not isinstance(source[0], dict)
    if not several:
        return {labels[0] if labels else "run": _as_log(source)}
    if labels is not None and len(labels) != len(source):
        raise ValueError(f"{len(labels)} labels for {len(source)} runs; give one label per run")
    names = labels or [Path(s).parent.name if Path(str(s)).name == GATES_NAME else Path(str(s)).name
                       if isinstance(s, (str, os.PathLike)) else f"run {i}" for i, s in enumerate(source)]
    if len(set(names)) < len(names):
        names = [f"{n} ({i})" for i, n in enumerate(names)]
    return {n: _as_log(s) for n, s in zip(names, source)}


def run_colors(n_runs: int) -> list:
    """A colour per run (tab10): used when several runs share a plot (heads then differ by line width)."""
    plt = pyplot()
    palette = plt.colormaps["tab10"].colors
    return [palette[i % len(palette)] for i in range(n_runs)]


def _x_of(log: GateLog, x: str) -> np.ndarray:
    if x == "step":
        return log.steps
    if x in ("lr_sum", "cumulative_lr"):
        return log.cumulative_lr()
    raise ValueError(f"x must be 'step' or 'lr_sum'; got {x!r}")


def _reduce(values: np.ndarray, reduce: str) -> np.ndarray:
    """(S, ...) -> (S,): "mean_abs" (mean of |values|) or "mean" over everything after the first axis."""
    flat = values.reshape(len(values), -1)
    return _nanmean(np.abs(flat) if reduce == "mean_abs" else flat, 1)


def _nanmean(values: np.ndarray, axis: int) -> np.ndarray:
    """np.nanmean without the warning for an all-NaN slice (a record without that field): NaN there."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis)


def plot_runs(runs, quantity: str = "gates", x: str = "step", layer: Optional[int] = None,
              heads: Optional[Sequence[int]] = None, reduce: str = "mean_abs", ax=None, legend: bool = True):
    """Several runs on one plot: one colour per run.

    Without ``layer``: one line per run, |quantity| averaged over layers and heads (``reduce``:
    "mean_abs" or "mean"). With ``layer``: one line per head of that layer (``heads``: a subset),
    signed, thin, in the run's colour. x: "step" or "lr_sum" (the summed learning rate so far:
    under AdamW early on every gate moves by about lr per update, so on this axis its curve is a
    line of slope about 1 while the moments warm up and the gradient keeps its sign).
    """
    plt = pyplot()
    runs = as_runs(runs)
    ax = ax or plt.figure(figsize=(5, 3)).gca()
    for (label, log), color in zip(runs.items(), run_colors(len(runs))):
        values, xs = log.quantity(quantity), _x_of(log, x)
        if layer is None:
            ax.plot(xs, _reduce(values, reduce), color=color, label=label)
            continue
        if layer not in log.layers:
            raise ValueError(f"layer {layer} has no gate in run {label!r}; its gated layers are {log.layers}")
        i = log.layers.index(layer)
        for j, h in enumerate(range(values.shape[2]) if heads is None else heads):
            ax.plot(xs, values[:, i, h], color=color, lw=0.8, alpha=0.8, label=label if j == 0 else None)
    what = QUANTITY_LABELS[quantity]
    ax.set_xlabel("step" if x == "step" else "summed learning rate so far")
    ax.set_ylabel((f"mean |{what}|" if reduce == "mean_abs" else f"mean {what}") if layer is None else what)
    ax.set_title(f"{what}, " + ("mean over layers and heads" if layer is None else f"heads of layer {layer}"))
    if legend and len(runs) <= 12:
        ax.legend(fontsize="small")
    return ax


# --------------------------------------------------------------------------- the explorer
def explorer(source, labels: Optional[Sequence[str]] = None):
    """An ipywidgets explorer of one gate log or several overlaid.

    source: what :func:`as_runs` takes (a run folder, a gates.jsonl, a GateLog; or a dict/list of
    them: seeds, settings, a 7B run's log). Controls: the step (a slider over every logged step),
    the layer and heads of the curves, the quantity (gate, and raw g, gradient, prompt norm,
    prompt share when recorded) and the x axis (step or summed learning rate).
    One run: heatmap (layer x step), head curves, per-layer bars at the chosen step.
    Several: per-run mean over layers and heads, head curves coloured by run, grouped bars.
    Returns the widget (display it as the last expression of a cell); ``.redraw()`` draws again.
    """
    import ipywidgets as widgets
    from IPython.display import display

    plt = pyplot()
    runs = as_runs(source, labels)
    logs = list(runs.values())
    steps = sorted({int(s) for log in logs for s in log.steps})
    layers = sorted({l for log in logs for l in log.layers})
    n_heads = max(log.gates.shape[2] for log in logs)
    quantities = [q for q in QUANTITIES if all(getattr(log, q) is not None for log in logs)]
    step = widgets.SelectionSlider(options=steps, value=steps[-1], description="step", continuous_update=False)
    layer = widgets.Dropdown(options=layers, value=layers[-1], description="layer")
    heads = widgets.SelectMultiple(options=list(range(n_heads)), value=tuple(range(n_heads)), description="heads",
                                   rows=min(n_heads, 6))
    quantity = widgets.Dropdown(options=quantities, value="gates", description="show")
    x_axis = widgets.Dropdown(options=[("step", "step"), ("summed lr", "lr_sum")], value="step", description="x")
    out = widgets.Output()

    def redraw(*_):
        with out:
            out.clear_output(wait=True)
            fig = draw_explorer(runs, step.value, layer.value, list(heads.value) or None, quantity.value, x_axis.value)
            display(fig)
            plt.close(fig)

    for w in (step, layer, heads, quantity, x_axis):
        w.observe(redraw, names="value")
    redraw()
    box = widgets.VBox([widgets.HBox([step, layer, heads]), widgets.HBox([quantity, x_axis]), out])
    box.redraw = redraw
    return box


def draw_explorer(runs, step: int, layer: int, heads: Optional[Sequence[int]] = None, quantity: str = "gates",
                  x: str = "step"):
    """The explorer's figure for one state of its controls (what every redraw shows) -> Figure."""
    plt = pyplot()
    runs = as_runs(runs)
    logs = list(runs.values())
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    if len(logs) == 1:
        log = logs[0]
        index = _index_at(log, step)
        if quantity == "gates":
            plot_heatmap(log, axes[0])
        else:
            _quantity_heatmap(log, quantity, axes[0])
        axes[0].axvline(log.steps[index], color="red", lw=1)
        if quantity == "gates" and x == "step":
            plot_head_curves(log, layer, axes[1], heads=heads)
        else:
            plot_runs(runs, quantity, x, layer=layer, heads=heads, ax=axes[1], legend=False)
        axes[1].axvline(_x_of(log, x)[index], color="red", lw=1)
        _bars(runs, quantity, step, axes[2])
    else:
        plot_runs(runs, quantity, x, ax=axes[0])
        plot_runs(runs, quantity, x, layer=layer, heads=heads, ax=axes[1], legend=False)
        _bars(runs, quantity, step, axes[2])
    fig.tight_layout()
    return fig


def _index_at(log: GateLog, step: int) -> int:
    """The last record at or before ``step`` (the first record if the run starts later)."""
    return max(0, int(np.searchsorted(log.steps, step, side="right")) - 1)


def _quantity_heatmap(log: GateLog, quantity: str, ax) -> None:
    data = _nanmean(np.abs(log.quantity(quantity)), -1)  # (S, L), NaN where not recorded
    steps = log.steps.astype(float)
    mids = (steps[1:] + steps[:-1]) / 2 if len(steps) > 1 else np.array([])
    x_edges = np.concatenate([[steps[0]], mids, [steps[-1] + (0 if len(steps) > 1 else 1)]])
    im = ax.pcolormesh(x_edges, np.arange(len(log.layers) + 1) - 0.5, np.nan_to_num(data).T, cmap="viridis")
    ax.set_yticks(np.arange(len(log.layers)), [str(l) for l in log.layers])
    ax.set(xlabel="step", ylabel="adapted layer", title=f"mean |{QUANTITY_LABELS[quantity]}| over heads")
    ax.figure.colorbar(im, ax=ax, fraction=0.05)


def _bars(runs: dict, quantity: str, step: int, ax) -> None:
    """Mean |quantity| per layer at the record of ``step``: grouped bars, one colour per run."""
    logs = list(runs.values())
    layers = sorted({l for log in logs for l in log.layers})
    width = 0.8 / len(logs)
    colors = run_colors(len(logs)) if len(logs) > 1 else [layer_colors(len(layers))]
    for k, ((label, log), color) in enumerate(zip(runs.items(), colors)):
        values = np.abs(log.quantity(quantity)[_index_at(log, step)])  # (L, H)
        means = _nanmean(values, -1)
        x = np.array([layers.index(l) for l in log.layers]) + (k - (len(logs) - 1) / 2) * width
        ax.bar(x, means, width=width, color=color, label=label if len(logs) > 1 else "mean over heads")
        if len(logs) == 1:
            ax.scatter(np.repeat(x, values.shape[1]), values.reshape(-1), color="black", s=6, label="each head")
    step_ticks = range(len(layers)) if len(layers) <= 16 else range(0, len(layers), max(1, len(layers) // 8))
    ax.set_xticks(list(step_ticks), [str(layers[i]) for i in step_ticks])
    ax.set(xlabel="adapted layer", ylabel=f"|{QUANTITY_LABELS[quantity]}|", title=f"at step {step}")
    if len(logs) <= 12:
        ax.legend(fontsize="small")


__all__ = [
    "GATES_NAME", "PLOT_NAME", "DETAILS", "QUANTITIES", "GateRecorder", "ablate_heads", "PromptShareMeter", "gate_record", "gate_details",
    "gate_gradients", "prompt_value_norms", "start_record", "read_gates", "GateLog", "summarize", "format_summary",
    "head_colors", "layer_colors", "run_colors", "plot_heatmap", "plot_head_curves", "plot_final_bars", "plot_loss_and_gates",
    "plot_summary", "save_plot", "as_runs", "plot_runs", "LivePlot", "explorer", "draw_explorer", "pyplot",
]
