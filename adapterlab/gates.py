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

Pictures: :func:`plot_heatmap` (layer x step), :func:`plot_head_curves` (heads of one layer),
:func:`plot_final_bars` (per-layer at the end), :func:`plot_summary` (all of them, loss beside
the gates; saved as gates.png at the end of every run), :class:`LivePlot` (redraws in a
notebook while training) and :func:`explorer` (ipywidgets: step slider, layer and head pickers).
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .adapter import adapted_layers, gate_values
from .files import atomic_write_text

GATES_NAME = "gates.jsonl"
PLOT_NAME = "gates.png"


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

    A training callback (on_start / on_step / on_end, see :class:`adapterlab.train.Callback`);
    :func:`adapterlab.train.train` adds one by itself to a run with an adapter and an ``out_dir``.

    On a resumed run, lines written after the checkpoint's step are dropped first, so the log of
    a run killed and resumed is identical to an uninterrupted one.
    """

    def __init__(self, out_dir: str | os.PathLike, every: int = 10, plot: bool = True):
        self.dir = Path(out_dir)
        self.path = self.dir / GATES_NAME
        self.every = every
        self.plot = plot
        self.total_steps: Optional[int] = None

    def on_start(self, state: dict) -> None:
        require_gates(state["model"], "GateRecorder")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.total_steps = state["total_steps"]
        if state["resumed"]:
            kept = [r for r in read_gates(self.path, missing_ok=True) if r["step"] <= state["start_step"]]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        else:
            atomic_write_text(self.path, json.dumps(start_record(state)) + "\n")

    def on_step(self, step: int, info: dict) -> None:
        if step % self.every == 0 or step == info["total_steps"]:
            line = json.dumps(gate_record(info["model"], step, info["epoch"], info["loss"], info["lr"]))
            with open(self.path, "a") as f:
                f.write(line + "\n")
                f.flush()

    def on_end(self, info: dict) -> None:
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
    """A gate log as arrays: steps (S,), gates (S, L, H), loss (S,) with NaN where absent, lr (S,)."""

    steps: np.ndarray
    gates: np.ndarray
    loss: np.ndarray
    lr: np.ndarray
    layers: list[int]

    @classmethod
    def from_records(cls, records: Sequence[dict]) -> "GateLog":
        if not records:
            raise ValueError("the gate log is empty")
        return cls(
            steps=np.array([r["step"] for r in records]),
            gates=np.array([r["gates"] for r in records], dtype=np.float64),
            loss=np.array([np.nan if r.get("loss") is None else r["loss"] for r in records], dtype=np.float64),
            lr=np.array([r.get("lr", np.nan) for r in records], dtype=np.float64),
            layers=list(records[-1]["layers"]),
        )

    @classmethod
    def read(cls, path: str | os.PathLike) -> "GateLog":
        return cls.from_records(read_gates(path))


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


def explorer(source):
    """An ipywidgets explorer of a gate log: step slider, layer and head pickers.

    Returns the widget (display it as the last expression of a cell).
    """
    import ipywidgets as widgets
    from IPython.display import display

    plt = pyplot()
    log = _as_log(source)
    n_heads = log.gates.shape[2]
    step = widgets.IntSlider(min=0, max=len(log.steps) - 1, value=len(log.steps) - 1, description="record",
                             continuous_update=False)
    layer = widgets.Dropdown(options=log.layers, value=log.layers[-1], description="layer")
    heads = widgets.SelectMultiple(options=list(range(n_heads)), value=tuple(range(n_heads)), description="heads",
                                   rows=min(n_heads, 6))
    out = widgets.Output()

    def redraw(*_):
        with out:
            out.clear_output(wait=True)
            fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
            plot_heatmap(log, axes[0])
            axes[0].axvline(log.steps[step.value], color="red", lw=1)
            plot_head_curves(log, layer.value, axes[1], heads=list(heads.value) or None)
            axes[1].axvline(log.steps[step.value], color="red", lw=1)
            plot_final_bars(log, axes[2], step_index=step.value)
            fig.tight_layout()
            display(fig)
            plt.close(fig)

    for w in (step, layer, heads):
        w.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox([step, layer, heads]), out])


__all__ = [
    "GATES_NAME", "PLOT_NAME", "GateRecorder", "gate_record", "start_record", "read_gates", "GateLog", "summarize", "format_summary",
    "head_colors", "layer_colors", "plot_heatmap", "plot_head_curves", "plot_final_bars", "plot_loss_and_gates", "plot_summary", "save_plot",
    "LivePlot", "explorer", "pyplot",
]
