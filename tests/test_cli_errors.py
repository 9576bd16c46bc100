"""The command line's error contract: a mistake in what the user gave prints one ``error: ...`` line
naming the file or flag, exits with status 2, shows no traceback, and trains or writes nothing.
Ctrl-C keeps the last checkpoint and says how to resume (exit 130)."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from adapterlab.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bad(small_base, tmp_path_factory) -> dict:
    """Files with the mistakes people make, beside the small base of conftest."""
    root = tmp_path_factory.mktemp("bad")
    (root / "not_utf8.json").write_bytes(b"\xff\xfe[{}]")
    (root / "not_a_list.json").write_text(json.dumps({"instruction": "a", "output": "b"}))
    (root / "no_output.json").write_text(json.dumps([{"instruction": "a", "input": ""}]))
    (root / "a_file").write_text("not a folder")
    (root / "neither").mkdir()
    (root / "neither" / "README.txt").write_text("weights elsewhere")
    peft = root / "peft_without_config"
    peft.mkdir()
    save_file({"base_model.model.model.layers.1.self_attn.adaption_prompt": torch.zeros(1, 4, 32)},
              str(peft / "adapter_model.safetensors"))
    (root / "no_log").mkdir()
    (root / "bad_gates.jsonl").write_text('{"step": 0\n{"step": 1, "layers": [1], "gates": [[0.0]]}\n')
    runs = [root / "run_a", root / "run_b"]  # two gate logs (a run writes more; the gates command reads only this)
    for run in runs:
        run.mkdir()
        (run / "gates.jsonl").write_text('{"step": 0, "layers": [1], "gates": [[0.0]], "lr": 0.1, "loss": 1.0}\n')
    return {"base": str(small_base / "base"), "data": str(small_base / "alpaca.json"), "root": root,
            "runs": [str(r) for r in runs]}


def finetune(b: dict, *extra: str, out: str = None) -> list[str]:
    return ["finetune", "--base", b["base"], "--data", b["data"], "--out", out or str(b["root"] / "run"),
            "--steps", "2", "--batch-size", "8", "--no-progress", *extra]


def replace_flag(argv: list[str], flag: str, value: str) -> list[str]:
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


# (name, argv from the fixture's files, what the message must name)
CASES = [
    ("missing base folder", lambda b: replace_flag(finetune(b), "--base", "/nonexistent"),
     ["--base", "/nonexistent", "is not a folder"]),
    ("neither Meta nor Hugging Face", lambda b: replace_flag(finetune(b), "--base", str(b["root"] / "neither")),
     ["--base", "neither", "README.txt"]),
    ("data not UTF-8", lambda b: replace_flag(finetune(b), "--data", str(b["root"] / "not_utf8.json")),
     ["--data", "not_utf8.json", "not UTF-8"]),
    ("data not a list", lambda b: replace_flag(finetune(b), "--data", str(b["root"] / "not_a_list.json")),
     ["not_a_list.json", "expected a JSON list"]),
    ("record missing output", lambda b: replace_flag(finetune(b), "--data", str(b["root"] / "no_output.json")),
     ["no_output.json", "record 0: missing field 'output'"]),
    ("negative steps", lambda b: replace_flag(finetune(b), "--steps", "-1"), ["--steps", "-1"]),
    ("zero batch size", lambda b: replace_flag(finetune(b), "--batch-size", "0"), ["--batch-size", "0"]),
    ("batch larger than the data", lambda b: replace_flag(finetune(b), "--batch-size", "1000"),
     ["--batch-size", "48 examples"]),
    ("non-numeric lr", lambda b: finetune(b, "--lr", "fast"), ["--lr", "'fast'"]),
    ("zero prompt length", lambda b: finetune(b, "--prompt-len", "0"), ["--prompt-len"]),
    ("adapter layers beyond the base", lambda b: finetune(b, "--adapter-layers", "5"),
     ["--adapter-layers 5", "the base has 2 layers"]),
    ("a LoRA flag for the adapter", lambda b: finetune(b, "--lora-rank", "4"), ["--lora-rank", "--method adapter"]),
    ("LoRA on a real base without lr", lambda b: finetune(b, "--method", "lora"), ["--lr", "LoRA tuning"]),
    ("out is a file", lambda b: finetune(b, out=str(b["root"] / "a_file")), ["--out", "a_file", "is a file"]),
    ("out under a file", lambda b: finetune(b, out=str(b["root"] / "a_file" / "run")), ["--out", "a_file"]),
    ("resume without checkpoint", lambda b: finetune(b, "--resume", out=str(b["root"] / "fresh")),
     ["--resume", "checkpoint.pt"]),
    ("negative threads", lambda b: finetune(b, "--threads", "-1"), ["--threads", "-1"]),
    ("missing adapter", lambda b: ["generate", "--base", b["base"], "--adapter", "/missing/folder",
                                   "--instruction", "Hi"], ["--adapter", "/missing/folder"]),
    ("PEFT folder without its config", lambda b: ["generate", "--base", b["base"], "--adapter",
                                                  str(b["root"] / "peft_without_config"), "--instruction", "Hi"],
     ["--adapter", "peft_without_config", "adapter_config.json"]),
    ("zero new tokens", lambda b: ["generate", "--base", b["base"], "--prompt", "Hi", "--max-new-tokens", "0"],
     ["--max-new-tokens"]),
    ("no gate log", lambda b: ["gates", str(b["root"] / "no_log")], ["no_log", "no gate log"]),
    ("broken gate log", lambda b: ["gates", str(b["root"] / "bad_gates.jsonl")], ["bad_gates.jsonl", "line 1"]),
    ("pretrain zero steps", lambda b: ["pretrain", "--steps", "0", "--out", str(b["root"] / "p")], ["--steps", "0"]),
    ("pretrain out is a file", lambda b: ["pretrain", "--steps", "1", "--out", str(b["root"] / "a_file")],
     ["--out", "a_file"]),
    ("demo out is a file", lambda b: ["demo", "--out", str(b["root"] / "a_file")], ["--out", "a_file"]),
    ("demo zero batch size", lambda b: ["demo", "--out", str(b["root"] / "d"), "--batch-size", "0"],
     ["--batch-size", "0"]),
    ("ablate out is a file", lambda b: ["ablate", "--out", str(b["root"] / "a_file"), "--steps", "2", "--seeds", "1"],
     ["--out", "a_file"]),
    ("ablate unknown variant", lambda b: ["ablate", "--out", str(b["root"] / "ab"), "--variants", "zero,lora"],
     ["--variants", "'zero,lora'"]),
    ("families unknown family", lambda b: ["families", "--family", "bert", "--out", str(b["root"] / "f")],
     ["--family", "'bert'"]),
    ("families out is a file", lambda b: ["families", "--family", "vit", "--out", str(b["root"] / "a_file")],
     ["--out", "a_file", "is a file"]),
    ("families unknown task", lambda b: ["families", "--family", "vit", "--out", str(b["root"] / "f"),
                                         "--tasks", "digits,clouds"], ["--tasks", "clouds"]),
    ("families method of the other family", lambda b: ["families", "--family", "roberta", "--out",
                                                       str(b["root"] / "f"), "--methods", "zero_init,linear"],
     ["--methods", "linear"]),
    ("families zero seeds", lambda b: ["families", "--family", "vit", "--out", str(b["root"] / "f"), "--seeds", "0"],
     ["--seeds", "0"]),
    ("demo two families", lambda b: ["demo", "--vit", "--roberta", "--out", str(b["root"] / "d")],
     ["--vit", "--roberta"]),
    ("demo vit with a learning rate", lambda b: ["demo", "--vit", "--lr", "0.1", "--out", str(b["root"] / "d")],
     ["demo vit does not use --lr 0.1"]),
    ("demo roberta out is a file", lambda b: ["demo", "--roberta", "--out", str(b["root"] / "a_file")],
     ["--out", "a_file"]),
    ("demo program and an old flag", lambda b: ["demo", "vit", "--multimodal", "--out", str(b["root"] / "d")],
     ["choose one demo program", "vit", "--multimodal"]),
    ("demo unknown program", lambda b: ["demo", "gpt", "--out", str(b["root"] / "d")], ["does not use gpt"]),
    ("demo multimodal with an adapter flag", lambda b: ["demo", "multimodal", "--gate", "layer"],
     ["demo multimodal does not use --gate layer"]),
    ("demo on an unknown base", lambda b: ["demo", "--base", "gpt2", "--out", str(b["root"] / "d")],
     ["--base gpt2", "tinyworld"]),
    ("finetune unknown optimizer", lambda b: finetune(b, "--optimizer", "adam"), ["--optimizer", "'adam'"]),
    ("gates names for the wrong number of runs", lambda b: ["gates", b["runs"][0], b["runs"][1], "--labels", "a"],
     ["--labels", "2 runs"]),
    ("gates follows one run only", lambda b: ["gates", "--follow", b["runs"][0], b["runs"][1]], ["--follow", "one RUN"]),
]


def files_under(root) -> set:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("name, argv, needles", CASES, ids=[c[0] for c in CASES])
def test_a_mistake_is_one_clear_line_and_status_2(bad, capsys, name, argv, needles):
    before = files_under(bad["root"])
    code = main(argv(bad))
    out, err = capsys.readouterr()
    assert code == 2, (name, out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: ") and all(l.startswith("  ") for l in lines[1:]), err  # more: bad records
    for needle in needles:
        assert needle in lines[0] + "\n".join(lines[1:]), (needle, err)
    assert files_under(bad["root"]) == before  # nothing trained, nothing written


def test_no_traceback_reaches_the_terminal(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "adapterlab", "finetune", "--base", "/nonexistent", "--data",
                           "tinyworld", "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --base: /nonexistent is not a folder") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


def test_ctrl_c_keeps_the_last_checkpoint_and_says_how_to_resume(bad, tmp_path, capsys):
    class CtrlC:
        def on_step(self, step, info):
            if step == 3:
                raise KeyboardInterrupt

    args = lambda out: replace_flag(finetune(bad, "--ckpt-every", "2", "--lr", "0.05", out=str(out)),  # noqa: E731
                                    "--steps", "5")
    assert main(args(tmp_path / "whole")) == 0
    assert main(args(tmp_path / "cut"), callbacks=[CtrlC()]) == 130
    assert "interrupted; rerun with --resume" in capsys.readouterr().err
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 2
    assert main(args(tmp_path / "cut") + ["--resume"]) == 0
    whole, resumed = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("whole", "cut"))
    assert resumed["resumed_from_step"] == 2 and resumed["final_loss"] == whole["final_loss"]
