"""Gate recording: the exact gates.jsonl format, reading it back, and the pictures."""
import base64
import json
import sys
from pathlib import Path

import numpy as np
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
    train(model, toy_data(), TrainConfig(steps=12, batch_size=8, lr=0.05, log_every=5, out_dir=str(out), progress=False),
          callbacks=[gates.GateRecorder(out, every=5)])
    out.joinpath("final_gates.json").write_text(json.dumps(gate_values(model).tolist()))
    return out


def test_gates_jsonl_has_exactly_the_documented_lines(run_dir):
    lines = (run_dir / "gates.jsonl").read_text().splitlines()
    records = [json.loads(l) for l in lines]
    assert [r["step"] for r in records] == [0, 5, 10, 12]  # step 0, every 5 steps, and the last step
    for r in records:
        assert list(r) == ["step", "epoch", "loss", "lr", "layers", "n_layers", "gates", "raw", "grad", "prompt_norm",
                           "prompt_share", "lr_sum"]
        assert r["n_layers"] == 2  # the model's depth: both of its layers adapted
        assert all(len(r[k]) == 2 and all(len(row) == 4 for row in r[k]) for k in ("raw", "prompt_norm"))
        assert isinstance(r["step"], int) and r["layers"] == [0, 1]
        assert len(r["gates"]) == 2 and all(len(row) == 4 for row in r["gates"])  # (adapted layers, heads)
    assert records[0]["loss"] is None and records[0]["gates"] == [[0.0] * 4] * 2  # zero-init: closed at step 0
    assert all(isinstance(r["loss"], float) and isinstance(r["lr"], float) for r in records[1:])
    assert records[2]["epoch"] == pytest.approx(10 / 5)  # 40 examples / batch 8 = 5 steps per epoch
    assert records[-1]["gates"] == json.loads((run_dir / "final_gates.json").read_text())  # effective tanh(g)
    assert records[0]["grad"] is None and records[0]["prompt_share"] is None and records[0]["lr_sum"] == 0.0
    for r in records[1:]:  # measured at the logged step: a gradient and a share for every gated head
        assert len(r["grad"]) == 2 and all(len(row) == 4 for row in r["grad"])
        assert all(0.0 <= v < 1.0 for row in r["prompt_share"] for v in row)
    np.testing.assert_allclose(records[-1]["raw"], np.arctanh(records[-1]["gates"]), rtol=1e-5)  # g before tanh


def test_an_old_log_with_gates_only_still_reads(tmp_path):
    old = [{"step": s, "epoch": s / 5, "loss": None if s == 0 else 1.0 / (1 + s), "lr": 0.01, "layers": [2, 3],
            "gates": [[0.01 * s] * 4, [-0.02 * s] * 4]} for s in (0, 5, 10)]
    (tmp_path / "gates.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    log = gates.GateLog.read(tmp_path)
    assert log.gates.shape == (3, 2, 4) and log.available() == ["gates"]
    assert log.raw is None and log.grad is None and log.prompt_share is None and log.lr_sum is None
    assert log.cumulative_lr().tolist() == pytest.approx([0.0, 0.05, 0.10])  # 0.01 for each of the steps between
    with pytest.raises(ValueError, match="has no 'grad'.*it has \\['gates'\\]"):
        log.quantity("grad")
    gates.plot_summary(log)  # the pictures need only the gates


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_the_recorded_gradient_is_the_one_the_update_used(tmp_path, optimizer):
    model = add_adapter(tiny_model(), AdapterConfig(prompt_len=4, layers=2))
    config = TrainConfig(steps=6, batch_size=8, lr=0.05, warmup_steps=2 if optimizer == "sgd" else 0, log_every=1,
                         out_dir=str(tmp_path), progress=False, optimizer=optimizer)
    train(model, toy_data(), config, callbacks=[gates.GateRecorder(tmp_path, every=1)])
    log = gates.GateLog.read(tmp_path)
    step = np.diff(log.raw, axis=0)  # (S-1, L, H): how each raw g moved at each update
    lr = log.lr[1:, None, None]
    assert log.lr_sum.tolist() == pytest.approx(np.concatenate([[0], np.cumsum(log.lr[1:])]).tolist(), rel=1e-6)
    if optimizer == "sgd":  # plain SGD: g <- g - lr (dL/dg + weight_decay g) (the per-head gate is 4-d: decayed)
        expected = -lr * (log.grad[1:] + config.weight_decay * log.raw[:-1])
        np.testing.assert_allclose(step, expected, rtol=1e-3, atol=1e-7)
    else:  # AdamW's first update moves every gate by exactly lr against its gradient's sign
        np.testing.assert_allclose(step[0], -log.lr[1] * np.sign(log.grad[1]), rtol=1e-4)
        assert log.lr[1] == 0.05 and not np.allclose(step[1], step[0])  # later steps: the moments decide


def _single_token_share(model, tokens):
    meter = gates.PromptShareMeter(model)
    try:
        model(tokens)  # a forward pass with gradients on: what training does
    finally:
        meter.remove()
    return np.array(meter.result())


def test_prompt_share_is_the_prompt_terms_share_and_leaves_padding_out():
    model = add_adapter(tiny_model(), AdapterConfig(prompt_len=4, layers=1, gate_activation="identity"))
    gate = model.layers[1].attention.adapter.gate
    with torch.no_grad():
        gate.copy_(torch.tensor([0.0, 0.3, -0.6, 1.2]).view(1, 4, 1, 1))
    one = torch.tensor([[1]])  # one position: share = a / (a + b) exactly
    s1 = _single_token_share(model, one)[0]
    assert s1[0] == 0.0 and np.all((s1[1:] > 0) & (s1[1:] < 1))
    with torch.no_grad():
        gate.mul_(2.0)  # the prompt term doubles, the token term stays: a/b doubles
    s2 = _single_token_share(model, one)[0]
    r1 = s1[1:] / (1 - s1[1:])
    np.testing.assert_allclose(s2[1:], 2 * r1 / (2 * r1 + 1), rtol=1e-5)
    seq = torch.tensor([[1, 9, 17, 33, 5]])
    padded = torch.cat([seq, torch.zeros(1, 3, dtype=torch.long)], dim=1)  # id 0: right padding
    np.testing.assert_allclose(_single_token_share(model, padded), _single_token_share(model, seq), rtol=1e-5)
    with torch.no_grad():
        meter = gates.PromptShareMeter(model)
        model(seq)  # evaluation (no gradients) is not measured
    assert meter.result() is None
    meter.remove()


def test_prompt_share_matches_the_token_term_of_the_frozen_layer():
    """The meter reads the token term off W_o's input; here it comes from the frozen model itself
    (the top layer alone is adapted, so its input is the frozen model's)."""
    model = add_adapter(tiny_model(), AdapterConfig(prompt_len=4, layers=1))
    with torch.no_grad():
        model.layers[1].attention.adapter.gate.copy_(torch.tensor([0.2, -0.5, 0.9, 1.5]).view(1, 4, 1, 1))
    seq = torch.tensor([[1, 9, 17, 33, 5, 2]])
    seen = {}
    attn = model.layers[1].attention
    hooks = [attn.wo.register_forward_pre_hook(lambda m, args: seen.setdefault("both", args[0].detach())),
             attn.adapter.register_forward_hook(lambda m, args, out: seen.setdefault("prompt", out.detach()))]
    adapter, attn.adapter = attn.adapter, None
    with torch.no_grad():
        model(seq)  # the frozen layer: W_o's input is the token term alone
    token = seen.pop("both").reshape(1, 6, 4, -1).transpose(1, 2)  # (B, H, T, d)
    attn.adapter = adapter
    with torch.no_grad():
        model(seq)
    for h in hooks:
        h.remove()
    a, b = seen["prompt"].norm(dim=-1), token.norm(dim=-1)  # (B, H, T)
    expected = (a / (a + b)).mean(dim=(0, 2))
    np.testing.assert_allclose(_single_token_share(model, seq)[0], expected.numpy(), rtol=1e-5)


def test_prompt_norm_is_the_length_of_the_prompt_values_per_head():
    model = add_adapter(tiny_model(), AdapterConfig(prompt_len=4, layers=2))
    norms = gates.prompt_value_norms(model)  # (L, H)
    for row, i in enumerate(gates.gated_layers(model)):
        attn = model.layers[i].attention
        values = attn.adapter.prompt.detach() @ attn.wv.weight.detach().T  # (K, H * d)
        per_head = values.view(4, 4, -1).norm(dim=-1)  # (K, H)
        torch.testing.assert_close(norms[row], per_head.pow(2).mean(0).sqrt())


def test_ablating_a_head_closes_only_its_gate_and_restores_it():
    model = add_adapter(tiny_model(), AdapterConfig(prompt_len=4, layers=2))
    with torch.no_grad():
        model.layers[1].attention.adapter.gate.copy_(torch.tensor([0.5, 0.0, -0.5, 1.0]).view(1, 4, 1, 1))
    before = gate_values(model).clone()
    tokens = torch.tensor([[1, 9, 17, 33, 5, 6]])
    seen = []

    def metric(m):
        seen.append(gate_values(m).clone())
        return float(m(tokens).float().pow(2).mean())

    base, ablated = gates.ablate_heads(model, metric)
    assert ablated.shape == (2, 4) and torch.equal(gate_values(model), before)  # restored
    assert ablated[0].tolist() == [base] * 4 and ablated[1, 1] == base  # closed gates: closing changes nothing
    assert ablated[1, 0] != base and ablated[1, 3] != base
    assert [int((s != before).sum()) for s in seen[1:]] == [0] * 4 + [1, 0, 1, 1]  # one gate at a time


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


def test_every_picture_says_how_many_layers_are_adapted(run_dir):
    """A fully adapted model (2 of 2) must not look like one with closed layers; an old log without
    the model's depth says only how many are adapted."""
    fig = gates.plot_summary(run_dir)
    labels = [ax.get_title() for ax in fig.axes] + [ax.get_xlabel() for ax in fig.axes] + [ax.get_ylabel() for ax in fig.axes]
    assert sum("2 of 2 layers adapted" in text for text in labels) >= 4  # heatmap, head curves, bars, loss panel
    ax = gates.plot_runs({"a": run_dir, "b": run_dir})
    assert ax.get_title().endswith("2 of 2 layers adapted")
    records = [{k: v for k, v in r.items() if k != "n_layers"} for r in gates.read_gates(run_dir)]
    assert gates.GateLog.from_records(records).n_layers is None
    assert gates.plots.adapted_note(records) == "2 layers adapted"


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
    slider, quantity, x_axis = w.children[0].children[0], w.children[1].children[0], w.children[1].children[1]
    assert list(slider.options) == [0, 5, 10, 12]
    assert list(quantity.options) == ["gates", "raw", "grad", "prompt_norm", "prompt_share"]
    slider.value = 5  # moving the slider redraws without error
    quantity.value, x_axis.value = "prompt_share", "lr_sum"


def test_explorer_shows_a_static_picture_where_no_widget_front_end_runs(run_dir):
    """nbconvert, GitHub's renderer and headless builds cannot draw widgets: the display bundle also holds a
    PNG of the current state, and it follows the controls."""
    pytest.importorskip("ipywidgets")
    w = gates.explorer(run_dir)
    bundle = w._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle  # a live front end still gets the widget
    png = base64.b64decode(bundle["image/png"])
    assert png.startswith(b"\x89PNG") and "static picture" in bundle["text/plain"]
    w.children[0].children[0].value = 0  # the slider: step 0, where the gates are still closed
    assert base64.b64decode(w._repr_mimebundle_()["image/png"]) != png


def synthetic_log(n_records: int, n_layers: int, n_heads: int, seed: int) -> list[dict]:
    """A gates.jsonl's records of the size a 7B run writes (30 layers x 32 heads)."""
    rng = np.random.default_rng(seed)
    slopes = rng.normal(0, 0.01, (n_layers, n_heads))
    return [{"step": 10 * s, "epoch": s / 10, "loss": 2.0 / (1 + s), "lr": 1e-3, "layers": list(range(2, 2 + n_layers)),
             "gates": np.tanh(slopes * s).tolist(), "prompt_share": np.abs(np.tanh(slopes * s) / 2).tolist()}
            for s in range(n_records)]


def test_explorer_overlays_runs_of_a_7b_sized_log(tmp_path, capsys):
    import time

    widgets = pytest.importorskip("ipywidgets")
    plt = gates.pyplot()
    runs = {}
    for seed in (0, 1):
        folder = tmp_path / f"seed{seed}"
        folder.mkdir()
        (folder / "gates.jsonl").write_text("".join(json.dumps(r) + "\n" for r in synthetic_log(300, 30, 32, seed)))
        runs[f"seed {seed}"] = folder
    logs = gates.as_runs(list(runs.values()))
    assert list(logs) == ["seed0", "seed1"] and logs["seed0"].gates.shape == (300, 30, 32)
    w = gates.explorer(runs)
    assert isinstance(w, widgets.VBox)
    assert list(w.children[1].children[0].options) == ["gates", "prompt_share"]  # what both runs recorded
    start = time.perf_counter()
    fig = gates.draw_explorer(logs, step=1500, layer=31, quantity="prompt_share", x="lr_sum")
    seconds = time.perf_counter() - start
    lines = fig.axes[0].get_lines()
    assert len(lines) == 2  # one mean curve per run
    np.testing.assert_allclose(lines[0].get_ydata(), np.abs(logs["seed0"].prompt_share).mean(axis=(1, 2)))
    assert len(fig.axes[1].get_lines()) == 2 * 32  # every head of layer 31, for both runs
    plt.close(fig)
    with capsys.disabled():
        print(f"\n[explorer] one redraw of 2 runs x 300 records x 30 layers x 32 heads: {seconds:.2f} s")
    with pytest.raises(ValueError, match="no gate in run"):
        gates.plot_runs(logs, layer=40)


def test_train_records_gates_only_when_asked(tmp_path):
    """train() attaches no recorder by itself: a run writes gates.jsonl when a GateRecorder is a callback."""
    model = add_adapter(tiny_model(), AdapterConfig(prompt_len=4, layers=2))
    train(model, toy_data(), TrainConfig(steps=3, batch_size=8, lr=0.05, out_dir=str(tmp_path), progress=False))
    assert (tmp_path / "metrics.json").exists()
    assert not (tmp_path / "gates.jsonl").exists() and not (tmp_path / "gates.png").exists()


def test_ungated_prompts_have_no_gate_to_record(tmp_path):
    from adapterlab.studies.variants import add_ungated_prompts

    model = add_ungated_prompts(tiny_model(), AdapterConfig(prompt_len=4, layers=2))
    assert gates.gated_layers(model) == [] and gate_values(model).shape == (0, 4)
    for callback in (gates.GateRecorder(tmp_path / "asked"), gates.LivePlot(every=1)):
        with pytest.raises(ValueError, match=r"no gate to record - its prompts \(layers \[0, 1\]\) are ungated"):
            train(model, toy_data(), TrainConfig(steps=1, batch_size=8, progress=False), callbacks=[callback])
