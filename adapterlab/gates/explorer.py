"""Gates in a notebook: :class:`LivePlot` (redraws while training) and :func:`explorer` (ipywidgets:
step slider, layer, head and quantity pickers; one run or several overlaid).
"""
from __future__ import annotations

import base64
import io
from typing import Optional, Sequence

import numpy as np

from .log import QUANTITIES, GateLog
from .plots import (QUANTITY_LABELS, _in_notebook, _nanmean, _x_of, adapted_note, as_runs, layer_colors,
                    plot_head_curves, plot_heatmap, plot_runs, plot_summary, pyplot, run_colors)
from .record import gate_record, require_gates, start_record


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

    def static_png() -> bytes:
        fig = draw_explorer(runs, step.value, layer.value, list(heads.value) or None, quantity.value, x_axis.value)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=72, bbox_inches="tight")
        plt.close(fig)
        return buffer.getvalue()

    class Explorer(widgets.VBox):
        """The controls and the figure; where no widget front end runs (nbconvert, GitHub's renderer, a
        headless build) the notebook shows the picture of the current state instead of nothing."""

        def _repr_mimebundle_(self, **kwargs):
            bundle = super()._repr_mimebundle_(**kwargs) or {}
            bundle = dict(bundle)
            bundle["image/png"] = base64.b64encode(static_png()).decode("ascii")
            bundle["text/plain"] = (f"gate explorer at step {step.value}, layer {layer.value} "
                                    "(a static picture where no widget front end is attached)")
            return bundle

    for w in (step, layer, heads, quantity, x_axis):
        w.observe(redraw, names="value")
    redraw()
    box = Explorer([widgets.HBox([step, layer, heads]), widgets.HBox([quantity, x_axis]), out])
    box.redraw = redraw
    box.static_png = static_png
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
    ax.set(xlabel="step", ylabel="adapted layer",
           title=f"mean |{QUANTITY_LABELS[quantity]}| over heads\n{adapted_note(log)}")
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
    ax.set(xlabel="adapted layer", ylabel=f"|{QUANTITY_LABELS[quantity]}|",
           title=f"at step {step}\n{adapted_note(runs)}")
    if len(logs) == 1:
        ax.legend(fontsize="small")
    elif len(logs) <= 12:  # one entry per run: beside the bars, not over them
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
