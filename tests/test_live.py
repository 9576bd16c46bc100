"""The live gate view: tailing a gates.jsonl that is being written (adapterlab.gates.live)."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from adapterlab.gates.live import GateTail, LiveGates, follow_gates, render_png, summary_line, text_heatmap

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def record(step: int, n_layers: int = 3, n_heads: int = 2) -> dict:
    """A gate record as the recorder writes it; gate of (layer i, head h) = step * (i + 1) * (h + 1) / 1000."""
    return {"step": step, "epoch": step / 100, "loss": 5.0 / step, "lr": 1e-3, "layers": list(range(5, 5 + n_layers)),
            "gates": [[step * (i + 1) * (h + 1) / 1000 for h in range(n_heads)] for i in range(n_layers)]}


def line(rec: dict) -> str:
    return json.dumps(rec) + "\n"


def test_tail_missing_file_partial_line_and_bad_line(tmp_path):
    tail = GateTail(tmp_path)
    assert tail.poll() == []  # no file yet: nothing, no error
    path = tmp_path / "gates.jsonl"
    first, second = line(record(10)), line(record(20))
    path.write_text(first + second[:15])  # the second line is half written
    assert [r["step"] for r in tail.poll()] == [10]
    assert tail.poll() == []  # still half a line
    with open(path, "a") as f:
        f.write(second[15:] + "not json\n" + line(record(30)))
    assert [r["step"] for r in tail.poll()] == [20, 30]
    assert [r["step"] for r in tail.records] == [10, 20, 30]
    assert tail.skipped == ["not json"]
    assert tail.records[1]["gates"] == record(20)["gates"]


def test_tail_restart_and_resumed_steps(tmp_path):
    path = tmp_path / "gates.jsonl"
    path.write_text("".join(line(record(s)) for s in (10, 20, 30)))
    tail = GateTail(path)
    assert len(tail.poll()) == 3
    with open(path, "a") as f:  # a run resumed from its step-20 checkpoint logs step 30 again
        f.write(line(record(30)) + line(record(40)))
    tail.poll()
    assert [r["step"] for r in tail.records] == [10, 20, 30, 40]
    path.write_text(line(record(10)))  # a fresh run rewrote the file
    assert [r["step"] for r in tail.poll()] == [10]
    assert tail.restarted and [r["step"] for r in tail.records] == [10]


def test_text_summaries_point_at_the_largest_gate():
    rec = record(100)
    assert "layer 7, head 1" in summary_line(rec)  # largest gate: last layer (index 2 -> layer 7), head 1
    rows = text_heatmap([record(s) for s in (10, 50, 100)]).splitlines()
    assert len(rows) == 1 + 3
    assert rows[1].startswith("layer   7") and rows[1].rstrip("|").endswith("@")  # top layer, last step darkest
    assert rows[3].startswith("layer   5") and "@" not in rows[3]
    assert text_heatmap([]) == "(no gate records yet)"


def _writer(path: Path, steps, delay: float, finish: bool = True) -> None:
    time.sleep(delay)
    with open(path / "gates.jsonl", "w") as f:
        for s in steps:
            text = line(record(s))
            f.write(text[:7])  # always leave a partial line for a moment
            f.flush()
            time.sleep(delay)
            f.write(text[7:])
            f.flush()
    if finish:
        (path / "metrics.json").write_text("{}")


def test_follow_until_the_run_finishes(tmp_path):
    writer = threading.Thread(target=_writer, args=(tmp_path, [10, 20, 30, 40], 0.05))
    writer.start()
    out = io.StringIO()
    records = follow_gates(tmp_path, interval=0.02, heatmap_every=2, out=out, timeout=60)
    writer.join()
    assert [r["step"] for r in records] == [10, 20, 30, 40]
    text = out.getvalue()
    assert text.count("step ") >= 4 and "run finished: 4 gate records" in text
    assert (tmp_path / "gates_live.png").read_bytes().startswith(PNG_MAGIC)


def test_follow_a_background_process(tmp_path):
    """The notebook pattern: a subprocess writes the log; following ends when it exits."""
    script = (f"import sys, json, time; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
              f"from test_live import _writer; from pathlib import Path; _writer(Path({str(tmp_path)!r}), [5, 10], 0.05, False)")
    proc = subprocess.Popen([sys.executable, "-c", script])
    out = io.StringIO()
    records = follow_gates(tmp_path, interval=0.05, png=None, process=proc, out=out, timeout=120)
    assert proc.returncode == 0
    assert [r["step"] for r in records] == [5, 10]
    assert not (tmp_path / "gates_live.png").exists()


def test_follow_gives_up_when_nothing_starts(tmp_path):
    out = io.StringIO()
    assert follow_gates(tmp_path, interval=0.01, wait_for_start=0.05, out=out) == []
    assert "no gate record" in out.getvalue()


def test_live_widget_redraws_and_finishes(tmp_path):
    pytest.importorskip("ipywidgets")
    live = LiveGates(tmp_path, interval=0.02, start=False, display=False)
    empty = bytes(live.image.value)
    assert empty.startswith(PNG_MAGIC)
    assert live.refresh() is False and "no gate record yet" in live.status.value
    (tmp_path / "gates.jsonl").write_text(line(record(10)) + line(record(20)))
    assert live.refresh() is False
    assert bytes(live.image.value) != empty and "step     20" in live.status.value
    (tmp_path / "metrics.json").write_text("{}")
    assert live.refresh() is True and "finished" in live.status.value

    # the background thread: follows a writer to the end
    other = tmp_path / "b"
    other.mkdir()
    writer = threading.Thread(target=_writer, args=(other, [1, 2, 3], 0.03))
    live = LiveGates(other, interval=0.02, display=False)
    writer.start()
    records = live.wait(timeout=60)
    writer.join()
    assert [r["step"] for r in records] == [1, 2, 3] and live.finished


def test_render_png_writes_atomically(tmp_path):
    data = render_png([record(s) for s in (1, 2, 3)], tmp_path / "x.png", title="t")
    assert data.startswith(PNG_MAGIC) and (tmp_path / "x.png").read_bytes() == data
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_finished_run_is_shown_and_a_restarted_one_followed(tmp_path):
    import os

    from adapterlab.gates.live import run_finished

    (tmp_path / "gates.jsonl").write_text(line(record(10)) + line(record(20)))
    (tmp_path / "metrics.json").write_text("{}")
    t = time.time_ns()
    os.utime(tmp_path / "gates.jsonl", ns=(t - 10**9, t - 10**9))
    os.utime(tmp_path / "metrics.json", ns=(t, t))
    assert run_finished(tmp_path)  # metrics.json written after the last gate record
    out = io.StringIO()
    assert [r["step"] for r in follow_gates(tmp_path, interval=0.01, png=None, out=out)] == [10, 20]
    os.utime(tmp_path / "gates.jsonl", ns=(t + 10**9, t + 10**9))  # --resume rewrote the log: running again
    assert not run_finished(tmp_path)
    (tmp_path / "metrics.json").unlink()
    assert not run_finished(tmp_path)
