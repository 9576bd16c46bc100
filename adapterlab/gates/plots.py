"""Pictures of a gate log: heatmap (layer x step), head curves, per-layer bars, the summary figure
(``gates.png``), and several runs on one plot. matplotlib is imported only when a picture is drawn.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .log import GATES_NAME, GateLog, _as_log

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


def adapted_note(source) -> str:
    """How many of the model's layers carry a gate: "4 of 4 layers adapted" (just "4 layers adapted"
    for a log that did not record the model's depth). Every picture of a log says it, so a plot of
    a fully adapted model is not read as "the other layers stayed closed"."""
    runs = list(as_runs(source).values()) if isinstance(source, dict) else [_as_log(source)]
    counts = {(len(log.layers), log.n_layers) for log in runs}
    if len(counts) > 1:
        return "adapted layers differ between runs"
    L, n = counts.pop()
    return f"{L} of {n} layers adapted" if n else f"{L} layers adapted"


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
    ax.set_title(("gate opening, mean |tanh(g)| over heads" if reduce == "mean_abs" else f"gate of head {reduce}")
                 + f"\n{adapted_note(log)}")
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
    ax.set_title(f"layer {layer}: gate per head\n{adapted_note(log)}")
    if log.gates.shape[2] <= 8:  # beside the plot: the curves fan out over all of it
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
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
    ax.set_title(f"gates at step {int(log.steps[step_index])}\n{adapted_note(log)}")
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
    # below the axes: inside, the legend would cover the curves (they cross the whole plot)
    ax2.legend(handles, [h.get_label() for h in handles], fontsize="small", loc="upper center",
               bbox_to_anchor=(0.5, -0.2), ncol=min(len(handles), 5), frameon=False)
    ax.set_title(f"training loss and mean |gate| per layer\n{adapted_note(log)}")
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
    ax.set_title(f"{what}, " + ("mean over layers and heads" if layer is None else f"heads of layer {layer}")
                 + f"\n{adapted_note(runs)}")
    if legend and len(runs) <= 12:
        ax.legend(fontsize="small")
    return ax
