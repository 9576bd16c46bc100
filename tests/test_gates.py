"""Gate recording: the exact gates.jsonl format, reading it back, and the pictures."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import tiny_model, toy_data  # noqa: E402

from adapterlab import gates
from adapterlab.adapter import AdapterConfig, add_adapter, gate_values
from adapterlab.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    torch.set_num_threads(1)
    model = add_adapter(tiny_model(), AdapterConfig(prompt_len=4, layers=2))
    train(model, toy_data(), TrainConfig(steps=12, batch_size=8, lr=0.05, log_every=5, out_dir=str(out), progress=False))
    out.joinpath("final_gates.json").write_text(json.dumps(gate_values(model).tolist()))
    return out


def test_gates_jsonl_has_exactly_the_documented_lines(run_dir):
    lines = (run_dir / "gates.jsonl").read_text().splitlines()
    records = [json.loads(l) for l in lines]
    assert [r["step"] for r in records] == [0, 5, 10, 12]  # step 0, every 5 steps, and the last step
    for r in records:
        assert list(r) == ["step", "epoch", "loss", "lr", "layers", "gates"]
        assert isinstance(r["step"], int) and r["layers"] == [0, 1]
        assert len(r["gates"]) == 2 and all(len(row) == 4 for row in r["gates"])  # (adapted layers, heads)
    assert records[0]["loss"] is None and records[0]["gates"] == [[0.0] * 4] * 2  # zero-init: closed at step 0
    assert all(isinstance(r["loss"], float) and isinstance(r["lr"], float) for r in records[1:])
    assert records[2]["epoch"] == pytest.approx(10 / 5)  # 40 examples / batch 8 = 5 steps per epoch
    assert records[-1]["gates"] == json.loads((run_dir / "final_gates.json").read_text())  # effective tanh(g)


def test_gates_png_is_written_at_the_end(run_dir):
    png = run_dir / "gates.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_read_gates_skips_a_torn_last_line_only(tmp_path, run_dir):
    text = (run_dir / "gates.jsonl").read_text()
    torn = tmp_path / "gates.jsonl"
    torn.write_text(text + '{"step": 14, "epo')
    assert len(gates.read_gates(torn)) == 4
    assert len(gates.read_gates(tmp_path)) == 4  # a folder works too
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 0}\n' + text)
    with pytest.raises(ValueError, match=r"bad.jsonl: line 1 has no 'layers'"):
        gates.read_gates(bad)
    with pytest.raises(FileNotFoundError, match="no gate log"):
        gates.read_gates(tmp_path / "missing.jsonl")


def test_summary_and_log_arrays(run_dir):
    log = gates.GateLog.read(run_dir)
    assert log.gates.shape == (4, 2, 4) and log.steps.tolist() == [0, 5, 10, 12]
    s = gates.summarize(run_dir)
    assert s["layers"][0]["start_mean_abs"] == 0.0 and s["layers"][0]["end_mean_abs"] > 0.01
    text = gates.format_summary(s)
    assert "steps 0..12" in text and "layer" in text


def test_plots_draw_every_panel(run_dir):
    fig = gates.plot_summary(run_dir)
    assert len(fig.axes) >= 4  # heatmap (+ colorbar), head curves, bars, loss (+ twin axis)
    titles = " ".join(ax.get_title() for ax in fig.axes)
    assert "layer 1" in titles and "step 12" in titles
    with pytest.raises(ValueError, match="adapted layers are"):
        gates.plot_head_curves(run_dir, layer=7)


def test_live_plot_collects_records_outside_a_notebook():
    model = add_adapter(tiny_model(), AdapterConfig(prompt_len=4, layers=1))
    live = gates.LivePlot(every=3)
    train(model, toy_data(), TrainConfig(steps=6, batch_size=8, lr=0.05, progress=False), callbacks=[live])
    assert [r["step"] for r in live.records] == [0, 3, 6] and live.records[0]["gates"] == [[0.0] * 4]


def test_live_plot_starts_at_the_step_epoch_and_lr_of_a_resumed_run(tmp_path):
    from adapterlab.train import Schedule, lr_at

    def stop_at_7(step, info):
        if step == 7:
            raise KeyboardInterrupt  # killed after the checkpoint of step 5

    config = TrainConfig(steps=12, batch_size=8, lr=0.05, warmup_steps=2, ckpt_every=5, out_dir=str(tmp_path),
                         progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(add_adapter(tiny_model(), AdapterConfig(prompt_len=4, layers=1)), toy_data(), config, callbacks=[stop_at_7])
    live = gates.LivePlot(every=3)
    config.resume = True
    train(add_adapter(tiny_model(), AdapterConfig(prompt_len=4, layers=1)), toy_data(), config, callbacks=[live])
    first = live.records[0]
    assert (first["step"], first["epoch"]) == (5, 1.0)  # 40 examples / batch 8 = 5 steps per epoch
    assert first["lr"] == pytest.approx(lr_at(5, Schedule(12, 5, 2), 0.05)) and first["lr"] > 0.01
    assert first["gates"] != [[0.0] * 4]  # the resumed adapter's gates, not a fresh one's


def test_explorer_is_a_widget(run_dir):
    widgets = pytest.importorskip("ipywidgets")
    w = gates.explorer(run_dir)
    assert isinstance(w, widgets.VBox)
    slider = w.children[0].children[0]
    slider.value = 1  # moving the slider redraws without error


def test_an_ungated_adapter_gets_no_gate_log(tmp_path):
    model = add_adapter(tiny_model(), AdapterConfig(prompt_len=4, layers=2, gate="none"))
    assert gates.gated_layers(model) == [] and gate_values(model).shape == (0, 4)
    train(model, toy_data(), TrainConfig(steps=3, batch_size=8, lr=0.05, out_dir=str(tmp_path), progress=False))
    assert not (tmp_path / "gates.jsonl").exists() and not (tmp_path / "gates.png").exists()  # nothing to record
    for callback in (gates.GateRecorder(tmp_path / "asked"), gates.LivePlot(every=1)):
        with pytest.raises(ValueError, match=r"no gate to record - its adapter \(layers \[0, 1\]\) is ungated"):
            train(model, toy_data(), TrainConfig(steps=1, batch_size=8, progress=False), callbacks=[callback])
