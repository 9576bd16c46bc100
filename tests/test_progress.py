"""Progress of long jobs: a bar in a terminal or a notebook, a few plain lines in a log file."""
import io
import os
import subprocess
import sys

import pytest

from adapterlab.io.files import PlainProgress, progress_bar

pytestmark = pytest.mark.usefixtures("one_thread")


def test_plain_progress_prints_a_line_per_tenth_with_the_latest_values():
    out = io.StringIO()
    bar = PlainProgress(total=300, desc="adapter tuning", unit="step", file=out)
    for step in range(1, 301):
        if step % 10 == 0:
            bar.set_postfix(loss=f"{1 / step:.4f}")
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in out.getvalue()
    assert lines[0].startswith("adapter tuning: 30/300 steps (10%) in ") and lines[0].endswith("loss=0.0333")
    assert lines[-1].startswith("adapter tuning: 300/300 steps (100%)") and lines[-1].endswith("loss=0.0033")


def test_plain_progress_iterates_and_resumes_where_it_was():
    out = io.StringIO()
    assert list(PlainProgress(range(25), desc="pretraining", file=out)) == list(range(25))
    assert [l.split(" in ")[0] for l in out.getvalue().splitlines()] == \
        [f"pretraining: {n}/25 its ({4 * n}%)" for n in (3, 5, 8, 10, 13, 15, 18, 20, 23, 25)]
    out = io.StringIO()
    bar = PlainProgress(total=6, initial=3, unit="run", file=out)  # a resumed study: 3 of 6 runs were done
    for _ in range(3):
        bar.update(1)
    assert [l.split(" in ")[0] for l in out.getvalue().splitlines()] == ["4/6 runs (66%)", "5/6 runs (83%)",
                                                                        "6/6 runs (100%)"]


def test_a_bar_in_a_terminal_plain_lines_in_a_file(tmp_path, monkeypatch):
    with open(tmp_path / "log", "w") as log:
        monkeypatch.setattr(sys, "stderr", log)
        assert isinstance(progress_bar(total=5), PlainProgress)
        assert not isinstance(progress_bar(total=5, disable=True), PlainProgress)  # off: tqdm's no-op bar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert not isinstance(progress_bar(total=5), PlainProgress)


def test_a_training_run_with_stderr_in_a_file_logs_a_few_lines(small_base, tmp_path):
    """~170 redraws of a tqdm bar in a log file become 10 lines."""
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.run([sys.executable, "-m", "adapterlab", "finetune", "--base", str(small_base / "base"),
                               "--data", str(small_base / "alpaca.json"), "--out", str(tmp_path / "run"),
                               "--steps", "40", "--batch-size", "8", "--adapter-layers", "1"],
                              stdout=subprocess.PIPE, stderr=err, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "ADAPTERLAB_THREADS": "1"})
    assert proc.returncode == 0, log.read_text()
    text = log.read_text()
    lines = text.splitlines()
    progress = [l for l in lines if l.startswith("adapter tuning: ")]
    assert "\r" not in text and len(progress) == 10, text
    assert progress[-1].startswith("adapter tuning: 40/40 steps (100%)") and "loss=" in progress[-1]
    assert len(lines) == len(progress), text  # nothing else on stderr
