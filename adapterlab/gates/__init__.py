"""Watching the gates open: record the effective gates during training, read the log back, draw it.

Every zero-init gate starts at 0 (Eq. 7), so at step 0 the adapted model is the frozen model;
these modules show how the gates leave 0, layer by layer and head by head:

    record.py    GateRecorder (a training callback: DIR/gates.jsonl, gates.png), PromptShareMeter, ablate_heads
    log.py       read_gates, GateLog (the log as arrays), summarize
    plots.py     heatmap, head curves, bars, the summary figure, several runs on one plot
    explorer.py  LivePlot (redraws while training in a notebook), explorer (ipywidgets)
    live.py      follow a running job's gates.jsonl (terminal or notebook)

Imports the core and io only; matplotlib and ipywidgets are imported when a picture is drawn.
"""
from .explorer import LivePlot, draw_explorer, explorer
from .log import DETAILS, GATES_NAME, QUANTITIES, GateLog, format_summary, read_gates, summarize
from .plots import (PLOT_NAME, adapted_note, as_runs, head_colors, layer_colors, plot_final_bars, plot_head_curves,
                    plot_heatmap, plot_loss_and_gates, plot_runs, plot_summary, pyplot, run_colors, save_plot)
from .record import (GateRecorder, PromptShareMeter, ablate_heads, gate_details, gate_gradients, gate_record,
                     gated_layers, prompt_value_norms, require_gates, start_record)

__all__ = [
    "GATES_NAME", "PLOT_NAME", "DETAILS", "QUANTITIES", "GateRecorder", "ablate_heads", "PromptShareMeter", "gate_record",
    "gate_details", "gate_gradients", "gated_layers", "prompt_value_norms", "require_gates", "start_record",
    "read_gates", "GateLog", "summarize", "format_summary", "head_colors", "layer_colors", "run_colors", "plot_heatmap",
    "plot_head_curves", "plot_final_bars", "plot_loss_and_gates", "plot_summary", "save_plot", "as_runs", "plot_runs",
    "LivePlot", "explorer", "draw_explorer", "pyplot", "adapted_note",
]
