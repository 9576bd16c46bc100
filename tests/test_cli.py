"""The adapterlab command: every subcommand end to end on small inputs, errors, and the demo."""
import json
import subprocess
import sys
import warnings

import pytest
import torch

from adapterlab.worlds import tinyworld as tw
from adapterlab.cli import COMMANDS, main

RUN_FILES = {"metrics.json", "gates.jsonl", "gates.png", "adapter.safetensors", "adapter_config.json", "checkpoint.pt"}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "adapterlab", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for name in ("pretrain", "finetune", "generate", "gates", "demo"):
        assert name in out.stdout
    assert set(COMMANDS) >= {"pretrain", "finetune", "generate", "gates", "demo"}


def test_finetune_writes_a_complete_run_and_resumes(small_base, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["finetune", "--base", str(small_base / "base"), "--data", str(small_base / "alpaca.json"),
            "--out", str(out), "--steps", "6", "--batch-size", "8", "--micro-batch-size", "4", "--lr", "0.05",
            "--adapter-layers", "1", "--prompt-len", "4", "--log-every", "2", "--no-progress"]
    assert main(args) == 0
    assert RUN_FILES <= {p.name for p in out.iterdir()}
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 6 and m["trainable_params"] == 4 * 32 + 4 and m["base_params"] > 100 * m["trainable_params"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["prompt_len"] == 4 and cfg["adapted_layers"] == [1]
    steps = [json.loads(l)["step"] for l in (out / "gates.jsonl").read_text().splitlines()]
    assert steps == [0, 2, 4, 6]
    text = capsys.readouterr().out
    assert "48 examples" in text and "trained 132 adapter parameters" in text

    before = (out / "adapter.safetensors").read_bytes()
    assert main(args + ["--resume"]) == 0  # already finished: resumes at step 6, changes nothing
    assert (out / "adapter.safetensors").read_bytes() == before
    assert [json.loads(l)["step"] for l in (out / "gates.jsonl").read_text().splitlines()] == steps

    assert main(["gates", str(out), "--png", str(tmp_path / "g.png")]) == 0
    assert "steps 0..6" in capsys.readouterr().out and (tmp_path / "g.png").stat().st_size > 10_000

    assert main(["generate", "--base", str(small_base / "base"), "--adapter", str(out), "--instruction",
                 "Tell me where Ada lives.", "--greedy", "--max-new-tokens", "4"]) == 0
    assert ">>> Tell me where Ada lives." in capsys.readouterr().out


def test_pretrain_writes_a_meta_folder_that_load_llama_reads(tmp_path, capsys):
    from adapterlab.io.checkpoints import load_llama

    out = tmp_path / "base"
    assert main(["pretrain", "--out", str(out), "--steps", "2", "--no-progress"]) == 0
    assert {"params.json", "consolidated.00.pth", "tokenizer.model", "metrics.json"} <= {p.name for p in out.iterdir()}
    model = load_llama(out, device="cpu")
    assert model.config.dim == tw.Recipe().model["dim"] and model.tokenizer.n_words == tw.Recipe().vocab_size
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    assert "wrote the base" in capsys.readouterr().out


def test_bad_data_file_is_a_clear_error_not_a_traceback(small_base, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "a", "output": "b"}, {"instruction": "c", "input": ["x"], "output": "d"}]')
    code = main(["finetune", "--base", str(small_base / "base"), "--data", str(bad), "--out", str(tmp_path / "o"),
                 "--steps", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and str(bad) in err and "record 1: field 'input' must be a string, found list" in err
    assert not (tmp_path / "o").exists()  # nothing trained, nothing written
    assert main(["gates", str(tmp_path)]) == 2 and "no gate log" in capsys.readouterr().err


def test_adapter_layers_out_of_range(small_base, tmp_path, capsys):
    assert main(["finetune", "--base", str(small_base / "base"), "--data", str(small_base / "alpaca.json"),
                 "--out", str(tmp_path / "o"), "--steps", "2", "--adapter-layers", "5", "--no-progress"]) == 2
    assert "--adapter-layers 5: the base has 2 layers" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_demo_tunes_the_tiny_world_and_reports(tmp_path, capsys):
    """A short demo on the cached tiny-world base: held-out accuracy measurably improves."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "60", "--no-progress"]) == 0
    text = capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    assert RUN_FILES <= {p.name for p in out.iterdir()}
    for key in ("base_params", "trainable_params", "heldout_accuracy_before", "heldout_accuracy_after",
                "train_seconds", "samples_before", "samples_after"):
        assert key in m, key
    assert m["trainable_params"] < 0.01 * m["base_params"]
    assert m["heldout_accuracy_after"] >= m["heldout_accuracy_before"] + 0.2, m
    first = json.loads((out / "gates.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and all(g == 0.0 for row in first["gates"] for g in row)
    assert "held-out accuracy" in text and "Q:" in text


def test_finetune_compile_and_activation_checkpointing_train_the_same_adapter(small_base, tmp_path, monkeypatch):
    """--compile and --activation-checkpointing change speed and memory, not what is learned.

    Here --compile captures graphs with TorchDynamo and AOTAutograd but skips Inductor's C++ code
    generation (minutes on a small CPU); test_losses.py checks Inductor's numbers on the same blocks."""
    from safetensors.torch import load_file

    compiled = []
    real_compile = torch.compile

    def aot_eager_compile(fn, **kwargs):
        compiled.append(fn)
        return real_compile(fn, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", aot_eager_compile)

    def run(name, *extra):
        out = tmp_path / name
        assert main(["finetune", "--base", str(small_base / "base"), "--data", str(small_base / "alpaca.json"),
                     "--out", str(out), "--steps", "3", "--batch-size", "8", "--lr", "0.05", "--prompt-len", "4",
                     "--no-progress", *extra]) == 0
        return load_file(out / "adapter.safetensors")

    eager = run("eager")
    assert all(v.abs().max() > 0 for k, v in eager.items() if k.endswith("gate"))  # training moved the gates
    for name, extra in (("ckpt", ["--activation-checkpointing"]), ("compiled", ["--compile"])):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            other = run(name, *extra)
        assert not [w for w in caught if "compile_model" in str(w.message)], "fell back to eager"
        assert bool(compiled) == (name == "compiled"), "--compile must compile the blocks, and only then"
        assert eager.keys() == other.keys()
        for k in eager:
            assert torch.allclose(eager[k], other[k], atol=1e-4), (name, k)
