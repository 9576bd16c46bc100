"""Watch the gates open while a training job runs (in a terminal or a notebook).

Reads the gates.jsonl a GateRecorder writes (and train's metrics.json); imports files, train and the gate plots.

A run writes one JSON line per logged step to ``DIR/gates.jsonl`` (see :mod:`adapterlab.gates`);
rank 0 of a torchrun job does the same. This module tails that file:

    adapterlab gates --follow runs/alpaca          # terminal: summary lines + a refreshing PNG

    # notebook: start the job in the background, then watch it
    job = launch(["torchrun", "--nproc_per_node", "2", "-m", "adapterlab", "finetune", ...], log="train.log")
    live = LiveGates("runs/alpaca", process=job)   # displays a heatmap + curves, redrawn every 2 s
    live.wait()                                     # optional: block until the run ends

Robust to the things a live file does: it may not exist yet, its last line may be half
written, and the run may finish (``metrics.json`` appears or the process exits) or restart
(``--resume`` appends; a fresh run rewrites the file).
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, TextIO

from ..io.files import atomic_write_bytes
from .log import GATES_NAME
from ..train import METRICS_NAME

LIVE_PNG = "gates_live.png"


# --------------------------------------------------------------------------- reading a growing file
class GateTail:
    """Incremental reader of a growing ``gates.jsonl``: :meth:`poll` returns the new complete records.

    A line counts only once its newline is written (a half-written last line waits for the next
    poll). If the file shrinks or is replaced (a fresh run in the same folder), reading restarts
    and :attr:`restarted` is set. Records with a step not after the previous one (a resumed run
    re-logging steps) replace the later ones, so :attr:`records` is always one clean trajectory.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.path = path / GATES_NAME if path.is_dir() or path.suffix != ".jsonl" else path
        self.records: list[dict] = []
        self.skipped: list[str] = []  # complete lines that were not valid JSON records
        self.restarted = False
        self._offset = 0
        self._partial = b""
        self._inode: Optional[int] = None

    def poll(self) -> list[dict]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return []
        if (self._inode is not None and st.st_ino != self._inode) or st.st_size < self._offset:
            self._offset, self._partial, self.records, self.restarted = 0, b"", [], True
        self._inode = st.st_ino
        if st.st_size == self._offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        self._offset += len(chunk)
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")  # the last piece has no newline yet
        new = []
        for raw in lines:
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError:
                self.skipped.append(raw[:80].decode("utf-8", "replace"))
                continue
            if not isinstance(rec, dict) or "step" not in rec or "gates" not in rec:
                self.skipped.append(raw[:80].decode("utf-8", "replace"))
                continue
            while self.records and self.records[-1]["step"] >= rec["step"]:
                self.records.pop()  # a resumed run logs these steps again
            self.records.append(rec)
            new.append(rec)
        return new


def run_finished(run_dir: str | os.PathLike, process: Optional[subprocess.Popen] = None) -> bool:
    """Has the run ended? The process (if given) exited; otherwise ``metrics.json`` (written last,
    at the end of a run) is at least as new as ``gates.jsonl`` (which a fresh or resumed run rewrites
    when it starts, and appends to while it runs)."""
    if process is not None:
        return process.poll() is not None
    try:
        return (Path(run_dir) / METRICS_NAME).stat().st_mtime_ns >= (Path(run_dir) / GATES_NAME).stat().st_mtime_ns
    except FileNotFoundError:
        return False


# --------------------------------------------------------------------------- text summaries
def _abs_stats(gates: Sequence[Sequence[float]]) -> tuple[float, float, int, int]:
    """(mean |g|, max |g|, layer row, head) of one record's gates."""
    best, where, total, n = -1.0, (0, 0), 0.0, 0
    for i, row in enumerate(gates):
        for h, g in enumerate(row):
            a = abs(g)
            total, n = total + a, n + 1
            if a > best:
                best, where = a, (i, h)
    return (total / n if n else 0.0), max(best, 0.0), where[0], where[1]


def summary_line(rec: dict) -> str:
    """One terminal line for a gate record."""
    mean, top, row, head = _abs_stats(rec["gates"])
    layers = rec.get("layers") or list(range(len(rec["gates"])))
    parts = [f"step {rec['step']:>6}"]
    if rec.get("epoch") is not None:
        parts.append(f"epoch {rec['epoch']:.2f}")
    if rec.get("loss") is not None:
        parts.append(f"loss {rec['loss']:.4f}")
    if rec.get("lr") is not None:
        parts.append(f"lr {rec['lr']:.2e}")
    parts.append(f"|gate| mean {mean:.4f} max {top:.4f} (layer {layers[row]}, head {head})")
    return "  ".join(parts)


_SHADES = " .:-=+*#%@"


def text_heatmap(records: Sequence[dict], width: int = 60) -> str:
    """Adapted layers (rows, top layer first) x logged steps (columns) of mean |gate|, as characters."""
    if not records:
        return "(no gate records yet)"
    cols = records if len(records) <= width else [records[round(i * (len(records) - 1) / (width - 1))]
                                                   for i in range(width)]
    n_layers = len(cols[-1]["gates"])
    layers = cols[-1].get("layers") or list(range(n_layers))
    grid = [[sum(abs(g) for g in rec["gates"][i]) / max(1, len(rec["gates"][i])) if i < len(rec["gates"]) else 0.0
             for rec in cols] for i in range(n_layers)]
    top = max((v for row in grid for v in row), default=0.0) or 1.0
    lines = [f"mean |gate| per layer (darkest = {top:.4f}), steps {cols[0]['step']}..{cols[-1]['step']}"]
    for i in reversed(range(n_layers)):
        shades = "".join(_SHADES[min(len(_SHADES) - 1, int(v / top * (len(_SHADES) - 1) + 0.5))] for v in grid[i])
        lines.append(f"layer {layers[i]:>3} |{shades}|")
    return "\n".join(lines)


# --------------------------------------------------------------------------- pictures
def draw(records: Sequence[dict], fig=None, title: str = ""):
    """One matplotlib Figure: the layer x step heatmap, loss beside the per-layer gates, and the
    heads of the top adapted layer - the plotting functions of :mod:`adapterlab.gates`, so the
    live view looks like the ``gates.png`` written at the end of the run."""
    from matplotlib.figure import Figure

    from . import plots

    fig = fig or Figure(figsize=(13, 3.6), layout="constrained")
    fig.clear()
    axes = fig.subplots(1, 3)
    if len(records) < 2:  # a picture over steps needs two points
        for ax in axes:
            ax.set_axis_off()
        what = "waiting for gate records ..." if not records else f"step {records[0]['step']}: waiting for the next record ..."
        axes[1].text(0.5, 0.5, what, ha="center", va="center")
    else:
        plots.plot_heatmap(records, ax=axes[0])
        plots.plot_loss_and_gates(records, ax=axes[1])
        plots.plot_head_curves(records, ax=axes[2])
    if title:
        fig.suptitle(title)
    return fig


def render_png(records: Sequence[dict], path: Optional[str | os.PathLike] = None, title: str = "") -> bytes:
    """Draw and return PNG bytes; also write them atomically to ``path`` when given."""
    buf = io.BytesIO()
    draw(records, title=title).savefig(buf, format="png", dpi=90)
    data = buf.getvalue()
    if path is not None:
        atomic_write_bytes(path, data)  # an image viewer never sees half a PNG
    return data


# --------------------------------------------------------------------------- terminal follower
def follow_gates(run_dir: str | os.PathLike, interval: float = 2.0, png: Optional[str | os.PathLike] = "auto",
                 process: Optional[subprocess.Popen] = None, timeout: Optional[float] = None,
                 wait_for_start: Optional[float] = None, heatmap_every: int = 10, out: TextIO = sys.stdout,
                 on_update: Optional[Callable[[list[dict]], None]] = None) -> list[dict]:
    """Tail ``run_dir/gates.jsonl`` until the run ends; print a line per record; redraw a PNG.

    png: "auto" -> ``run_dir/gates_live.png``; None -> no picture. The run has ended when
    ``process`` exits (if given) or ``metrics.json`` is newer than ``gates.jsonl`` (so following
    a finished run prints it and returns).
    timeout: give up after that many seconds (None: follow until the end). wait_for_start:
    give up if no gate record appears within that many seconds. Returns all records.
    """
    run_dir = Path(run_dir)
    png_path = run_dir / LIVE_PNG if png == "auto" else (Path(png) if png else None)
    tail = GateTail(run_dir)
    started = time.time()
    print(f"following {tail.path} (Ctrl-C to stop){' -> ' + str(png_path) if png_path else ''}", file=out, flush=True)
    shown, finished = 0, False
    try:
        while True:
            finished = run_finished(run_dir, process)  # look first, then read: no record is missed
            new = tail.poll()
            if tail.restarted:
                print("(gates.jsonl was rewritten: a new run started; following it)", file=out, flush=True)
                tail.restarted, shown = False, 0
            for rec in new:
                print(summary_line(rec), file=out, flush=True)
                shown += 1
                if heatmap_every and shown % heatmap_every == 0:
                    print(text_heatmap(tail.records), file=out, flush=True)
            if new:
                if png_path is not None and png_path.parent.is_dir():
                    render_png(tail.records, png_path, title=str(run_dir))
                if on_update is not None:
                    on_update(tail.records)
            if finished:
                break
            waited = time.time() - started
            if timeout is not None and waited > timeout:
                print(f"stopped following after {timeout:g} s (the run goes on)", file=out, flush=True)
                break
            if wait_for_start is not None and not tail.records and waited > wait_for_start:
                print(f"no gate record in {tail.path} after {wait_for_start:g} s; is the run writing there?",
                      file=out, flush=True)
                break
            time.sleep(interval)
    except KeyboardInterrupt:
        print("stopped following (the run goes on)", file=out, flush=True)
    if tail.records:
        if not (heatmap_every and shown % heatmap_every == 0):  # (otherwise it was just printed)
            print(text_heatmap(tail.records), file=out, flush=True)
        if png_path is not None and png_path.parent.is_dir():
            render_png(tail.records, png_path, title=str(run_dir))
    if process is not None and process.poll() not in (None, 0):
        print(f"the training process exited with code {process.returncode}; see its log", file=out, flush=True)
    elif finished:
        print(f"run finished: {len(tail.records)} gate records", file=out, flush=True)
    for line in tail.skipped[:3]:
        print(f"(skipped a line that is not a gate record: {line!r})", file=out, flush=True)
    return tail.records


# --------------------------------------------------------------------------- notebook widget
def launch(cmd: Sequence[str], log: Optional[str | os.PathLike] = None, cwd: Optional[str | os.PathLike] = None,
           env: Optional[dict] = None) -> subprocess.Popen:
    """Start a (torchrun) training command in the background; its output goes to ``log`` (or is dropped).

    The notebook stays free: watch it with :class:`LiveGates`; stop it with ``job.terminate()``.
    """
    out = open(log, "w") if log else subprocess.DEVNULL
    try:
        return subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                env={**os.environ, **(env or {})})
    finally:
        if log:
            out.close()  # the child has its own handle


class LiveGates:
    """A notebook widget that redraws the gate heatmap and curves while a run writes gates.jsonl.

    ``LiveGates(dir, process=job)`` displays itself and polls in a background thread (the
    notebook stays usable); :meth:`wait` blocks until the run ends, :meth:`stop` stops watching.
    The picture is a PNG in an ``ipywidgets.Image`` (updating it from a thread is safe) under a
    status line; the last records are in :attr:`records`.
    """

    def __init__(self, run_dir: str | os.PathLike, process: Optional[subprocess.Popen] = None,
                 interval: float = 2.0, start: bool = True, display: bool = True):
        import ipywidgets as widgets

        self.run_dir = Path(run_dir)
        self.process = process
        self.interval = interval
        self.tail = GateTail(self.run_dir)
        self.status = widgets.HTML(value=f"waiting for {self.tail.path} ...")
        self.image = widgets.Image(format="png", value=render_png([]))
        self.out = widgets.Output()  # messages (errors) from the watcher thread
        self.widget = widgets.VBox([self.status, self.image, self.out])
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.finished = False
        if display:
            from IPython.display import display as show

            show(self.widget)
        if start:
            self.start()

    @property
    def records(self) -> list[dict]:
        return self.tail.records

    def refresh(self) -> bool:
        """Read new records and redraw if there are any; return True when the run has ended."""
        finished = run_finished(self.run_dir, self.process)
        new = self.tail.poll()
        if new or self.tail.restarted:
            self.tail.restarted = False
            self.image.value = render_png(self.tail.records, title=f"run {self.run_dir.name}")  # not a temp path
        last = self.tail.records[-1] if self.tail.records else None
        state = "finished" if finished else "running"
        if self.process is not None and finished and self.process.returncode:
            state = f"<b>process exited with code {self.process.returncode}</b>"
        self.status.value = (f"{self.run_dir}: {state}; " + (summary_line(last) if last else "no gate record yet"))
        self.finished = finished
        return finished

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                if self.refresh():
                    break
                self._stop.wait(self.interval)
        except Exception as e:  # show it in the widget instead of dying silently in a thread
            self.out.append_stderr(f"live view stopped: {type(e).__name__}: {e}\n")

    def start(self) -> "LiveGates":
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def wait(self, timeout: Optional[float] = None) -> list[dict]:
        """Block until the run ends (or ``timeout`` seconds); return the records."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.records

    def show(self) -> None:
        """Display the widget (again) in the current cell."""
        from IPython.display import display as show

        show(self.widget)

    def __repr__(self) -> str:
        state = "finished" if self.finished else "running"
        return f"LiveGates({str(self.run_dir)!r}, {len(self.records)} records, {state})"


__all__ = ["GateTail", "run_finished", "summary_line", "text_heatmap", "draw", "render_png", "follow_gates",
           "launch", "LiveGates"]
