"""The ablation on a real model's bench (adapterlab.studies.ablate with base="smollm2"): the variants at
step 0 on the English text, the run records and the summary's schema, resume, and the command line.

It runs on a tiny random Llama with a tiny byte-level BPE and the ChatML template (the real model's kind
of tokenizer), never on the real file: the suite stays fast and needs nothing installed.
"""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model
from test_tokenizer import make_tiny_bpe

from adapterlab.adapter import adapted_layers
from adapterlab.studies import ablate
from adapterlab.studies.ablate import AblationConfig
from adapterlab.tokenizer import BPETokenizer
from adapterlab.worlds import smollm2 as S

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = ("zero_init", "random_init", "ungated", "random_init_small")


def small_config(**changes) -> AblationConfig:
    """3 steps of batch 3 on 2 facts per kind, 1 held out per kind, 4 general questions, 64 tokens of text."""
    train = replace(ablate.study_train("smollm2"), steps=3, batch_size=3, warmup_steps=1, eval_every=2)
    settings = dict(base="smollm2", seeds=2, variants=VARIANTS, train=train,
                    adapter=replace(ablate.study_adapter("smollm2"), layers=2, prompt_len=3), early_steps=2,
                    watch_every=2, n_train=2, n_heldout=1, n_facts=4, text_tokens=64)
    return AblationConfig(**{**settings, **changes})


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory):
    """A random 2-layer Llama with a trained byte-level BPE and the ChatML template, frozen."""
    folder = tmp_path_factory.mktemp("tiny_bpe")
    make_tiny_bpe(folder)
    tokenizer = BPETokenizer.from_folder(folder)
    model = make_tiny_model(0, n_layers=2, vocab_size=tokenizer.n_words, max_seq_len=512).requires_grad_(False)
    model.tokenizer = tokenizer
    return model


# ---------------------------------------------------------------------------- the variants at step 0
def test_zero_init_keeps_the_bases_text_loss_exactly_and_random_gates_do_not(chat_base):
    config = small_config()
    bench = ablate.real_bench(config, base=chat_base)
    base_loss = S.text_loss(chat_base, bench.text)
    with torch.no_grad():
        reference = chat_base(bench.text)
        moved = {}
        for variant in VARIANTS:
            model = ablate.attach(bench.load_base(), config, variant, seed=0)
            step0 = ablate.knowledge(model, bench, facts=False)["corpus_loss"]
            assert (step0 == base_loss) is (variant == "zero_init"), variant  # Eq. 7: a zero gate adds nothing
            moved[variant] = (model(bench.text) - reference).abs().max().item()
    assert moved["zero_init"] == 0.0 and min(moved["random_init"], moved["ungated"]) > 0
    assert 0 < moved["random_init_small"] < moved["random_init"]  # the same draws, times 0.1
    assert not adapted_layers(chat_base), "every run gets a copy: the bench's base stays bare"


def test_the_gate_scales_apply_to_their_own_variant(chat_base):
    config = small_config(gate_scale=2.0, small_gate_scale=0.25)
    bench = ablate.real_bench(config, base=chat_base)
    big = ablate.attach(bench.load_base(), config, "random_init", seed=3)
    small = ablate.attach(bench.load_base(), config, "random_init_small", seed=3)
    for i in adapted_layers(big):
        assert torch.allclose(small.layers[i].attention.adapter.gate, big.layers[i].attention.adapter.gate / 8)


def test_the_real_bench_refuses_a_model_without_a_chat_template():
    with pytest.raises(ValueError, match="chat template"):
        ablate.real_bench(small_config(), base=make_tiny_model(0))


# ---------------------------------------------------------------------------- the runs and the summary
def test_a_real_study_records_the_tiny_worlds_keys_and_the_text_loss_during_the_run(chat_base, tmp_path):
    config = small_config()
    bench = ablate.real_bench(config, base=chat_base)
    summary = ablate.run_ablation(tmp_path, config, progress=False, command="test", bench=bench)
    runs = ablate.read_runs(tmp_path / "runs.jsonl")
    assert [(r["variant"], r["seed"]) for r in runs] == [(v, s) for s in range(2) for v in VARIANTS]
    base_loss = S.text_loss(chat_base, bench.text)
    for r in runs:
        for key in ("heldout_accuracy", "heldout_loss", "early_loss", "early_grad_norm", "loss_spikes",
                    "pretrain_loss_after", "facts_kept", "knowledge_at_init", "attention_share",
                    "text_loss_step0", "text_loss_final"):
            assert isinstance(r[key], (int, float)), key
        assert r["text_loss_step0"] == r["knowledge_at_init"] == r["knowledge_before"]["corpus_loss"]
        assert r["text_loss_final"] == r["pretrain_loss_after"] == r["knowledge_after"]["corpus_loss"]
        assert (r["text_loss_step0"] == base_loss) is (r["variant"] == "zero_init")
        assert r["text_loss_final"] != r["text_loss_step0"], "3 steps moved the model"
        assert len(r["losses"]) == len(r["grad_norms"]) == 3 and r["loss_spikes"] == ablate.loss_spikes(r["losses"])
        assert r["early_grad_norm"] == pytest.approx(sum(r["grad_norms"][:2]) / 2)
        # the knowledge during the run: text loss at step 0, the watched steps 1 and 2 and the end; facts too
        # where the held-out set is evaluated (step 2) and at both ends
        log = r["knowledge_log"]
        assert [k["step"] for k in log] == [0, 1, 2, 3]
        assert [("fact_accuracy" in k) for k in log] == [True, False, True, True]
        assert log[0] == {"step": 0, **r["knowledge_before"]} and log[-1] == {"step": 3, **r["knowledge_after"]}
        assert [e["step"] for e in r["eval_history"]] == [2, 3]
        assert [g["step"] for g in r["gate_log"]] == [0, 1, 2, 3]
        shares = r["gate_log"][0]["attention_share_by_head"]
        assert len(shares) == 2 and len(shares[0]) == chat_base.config.n_heads  # per adapted layer and head
        assert r["settings"]["base"] == "smollm2" and r["settings"]["n_facts"] == 4
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["variants"].keys() == set(VARIANTS) and on_disk["settings"]["small_gate_scale"] == 0.1
    for row in on_disk["variants"].values():
        assert {"heldout_accuracy", "early_loss", "pretrain_loss_after", "facts_kept", "text_loss_step0",
                "text_loss_final", "early_grad_norm", "loss_spikes"} <= set(row)
    assert {"cpu", "vector_unit", "threads", "torch"} <= set(on_disk["machine"])
    assert {(c["a"], c["b"]) for c in on_disk["comparisons"]} == {("zero_init", v) for v in VARIANTS[1:]}
    text = ablate.report(summary)
    assert "text loss after" in text and "general questions the chat reply still answers" in text
    assert "small random gates" in text and "early training (mean over the first 2 steps" in text
    assert "on loss on the English text after training" in text  # the verdicts say what the metric is
    assert (tmp_path / "ablation.png").stat().st_size > 10_000


def test_a_killed_real_study_resumes_with_only_the_missing_runs(chat_base, tmp_path):
    config = small_config(variants=("zero_init", "random_init"))
    bench = ablate.real_bench(config, base=chat_base)
    copies = []

    def dies_on_the_third_run():
        copies.append(1)
        if len(copies) == 3:
            raise KeyboardInterrupt
        return ablate.real_bench(config, base=chat_base).load_base()

    with pytest.raises(KeyboardInterrupt):
        ablate.run_ablation(tmp_path / "a", config, progress=False, plot=False,
                            bench=replace(bench, load_base=dies_on_the_third_run))
    assert [(r["variant"], r["seed"]) for r in ablate.read_runs(tmp_path / "a" / "runs.jsonl")] == [
        ("zero_init", 0), ("random_init", 0)]
    copies.clear()
    ablate.run_ablation(tmp_path / "a", config, progress=False, plot=False,
                        bench=replace(bench, load_base=lambda: copies.append(1) or bench.load_base()))
    assert len(copies) == 2, "only the two missing runs are done"
    ablate.run_ablation(tmp_path / "b", config, progress=False, plot=False, bench=bench)
    strip = lambda runs: [{k: v for k, v in r.items() if k != "seconds"} for r in runs]  # noqa: E731
    assert strip(ablate.read_runs(tmp_path / "a" / "runs.jsonl")) == strip(ablate.read_runs(tmp_path / "b" / "runs.jsonl"))
    with pytest.raises(ValueError, match="other settings.*n_heldout"):
        ablate.run_ablation(tmp_path / "a", small_config(n_heldout=2), progress=False, bench=bench)


# ---------------------------------------------------------------------------- settings
def test_a_tiny_world_study_keeps_its_settings_so_committed_folders_resume():
    committed = ablate.read_runs(Path(__file__).parents[1] / "docs" / "results" / "ablations" / "main" / "runs.jsonl")
    assert set(AblationConfig().run_settings()) == set(committed[0]["settings"])
    real = AblationConfig(base="smollm2")
    assert real.variants == VARIANTS and (real.train.batch_size, real.train.lr, real.adapter.layers) == (8, 1e-2, 8)
    assert real.run_settings()["base"] == "smollm2" and "probe_docs" not in real.run_settings()


def test_loss_spikes_count_steps_above_one_and_a_half_times_the_step_before():
    assert ablate.loss_spikes([2.0, 1.0, 1.6, 1.7, 0.5, 0.8]) == 2  # 1.0 -> 1.6 and 0.5 -> 0.8
    assert ablate.loss_spikes([1.0, 1.5, 2.25]) == 0 and ablate.loss_spikes([1.0, 1.51]) == 1


@pytest.mark.parametrize("kwargs,needle", [
    (dict(variants=("zero_init", "huge")), "variants"),
    (dict(small_gate_scale=0.0), "small_gate_scale"),
    (dict(n_facts=0), "n_facts"),
    (dict(watch_every=0), "watch_every"),
])
def test_bad_real_settings_are_named(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        small_config(**kwargs)


def test_cli_ablate_on_smollm2_takes_its_defaults_and_one_thread(monkeypatch, tmp_path, capsys):
    from adapterlab.cli import main

    seen = {}

    def fake_run(out, config, progress, command, threads):
        seen.update(config=config, threads=threads)
        rows = [{"variant": v, "seed": 0, "seconds": 1.0, "knowledge_before": {"corpus_loss": 2.8, "fact_accuracy": 1.0},
                 **{m: 0.5 for m in ablate.METRICS}} for v in config.variants]
        return ablate.summarize(rows, config, command)

    monkeypatch.setattr(ablate, "run_ablation", fake_run)
    monkeypatch.delenv("ADAPTERLAB_THREADS", raising=False)
    assert main(["ablate", "--base", "smollm2", "--seeds", "1", "--steps", "10", "--out", str(tmp_path),
                 "--no-progress"]) == 0
    c = seen["config"]
    assert c.base == "smollm2" and c.variants == VARIANTS and seen["threads"] == 1
    assert (c.train.steps, c.train.batch_size, c.train.lr, c.adapter.layers, c.train.eval_every) == (10, 8, 1e-2, 8, None)
    printed = capsys.readouterr().out
    assert "small random gates" in printed and "(frozen base: English text loss 2.800" in printed
    assert main(["ablate", "--base", "smollm2", "--out", str(tmp_path), "--small-gate-scale", "0.3",
                 "--layers", "30", "--lr", "0.003"]) == 0
    c = seen["config"]
    assert (c.small_gate_scale, c.adapter.layers, c.train.lr, c.train.steps, c.train.eval_every) == (0.3, 30, 0.003, 40, None)


def test_a_grid_of_studies_is_collected_into_one_summary_with_the_tiny_worlds_names(chat_base, tmp_path, capsys):
    from adapterlab.cli import main

    grid_dir = tmp_path / "grid"
    for layers, lr in ((2, 0.05), (1, 0.01)):  # written out of order: the summary sorts by L, then lr
        config = small_config(adapter=replace(ablate.study_adapter("smollm2"), layers=layers, prompt_len=3),
                              train=replace(small_config().train, lr=lr))
        ablate.run_ablation(grid_dir / f"L{layers}", config, progress=False, plot=False,
                            bench=ablate.real_bench(config, base=chat_base))
    (grid_dir / "notes").mkdir()  # a folder without runs is not a study

    grid = ablate.collect_grid(grid_dir)
    assert [(c["name"], c["layers"], c["lr"]) for c in grid["cells"]] == [("L1", 1, 0.01), ("L2", 2, 0.05)]
    assert json.loads((grid_dir / "summary.json").read_text()) == grid and (grid_dir / "grid.png").stat().st_size > 0
    runs = ablate.read_runs(grid_dir / "L2" / "runs.jsonl")
    for v in VARIANTS:
        row = grid["cells"][1]["variants"][v]
        mine = [r["text_loss_final"] for r in runs if r["variant"] == v]
        assert row["seeds"] == 2 and row["text_loss_final"]["mean"] == pytest.approx(sum(mine) / 2)
        assert row["knowledge_kept"] == row["pretrain_loss_after"]  # the tiny-world schema's name, same numbers
        for key in ("heldout_accuracy", "early_loss", "text_loss_step0", "facts_kept", "early_grad_norm"):
            assert key in row
    found = {(c["b"], c["metric"]) for c in grid["cells"][0]["comparisons"]}
    assert {(b, m) for b in VARIANTS[1:] for m in ablate.GRID_METRICS} == found
    step0 = ablate.grid_verdict(grid, "text_loss_step0", "random_init")
    assert sum(len(cells) for cells in step0.values()) == 2  # one verdict per cell
    assert ablate.cell_label(grid["cells"][0]) == "L=1, lr 0.01"
    matrix = ablate.verdict_matrix(grid).splitlines()
    assert matrix[0].split()[-4:] == ["L=1,", "lr", "0.01", "L=2,", "lr", "0.05"][-4:] and len(matrix) == 1 + 3 * 5
    for line, (other, metric) in zip(matrix[1:], [(o, m) for o in VARIANTS[1:] for m in ablate.VERDICT_METRICS
                                                   + ("text_loss_step0",)]):
        cells = [next(c for c in cell["comparisons"] if c["b"] == other and c["metric"] == metric)
                 for cell in grid["cells"]]
        assert line.split()[-2:] == [ablate.SHORT_VERDICTS[c["verdict"]] for c in cells], line

    said = ablate.grid_sentences(grid)
    assert said[0].startswith("2 cells (L=1, lr 0.01; L=2, lr 0.05), 2 seeds per variant and cell")
    assert "zero-init gates exactly the frozen base's" in said[1]  # Eq. 7 at step 0, in every run
    for line in said[-3:]:  # one per other variant: each metric's verdicts add up to the cells
        for part in line.split("): ", 1)[1].rstrip(".").split("; "):
            assert sum(map(int, re.fullmatch(r"[-a-zA-Z ']+ (\d)/(\d)/(\d)", part).groups())) == 2, part
    assert main(["ablate", "--collect", str(grid_dir)]) == 0
    printed = capsys.readouterr().out
    assert "== L=1, lr 0.01 (L1, 2 seeds" in printed and "== L=2, lr 0.05" in printed
    assert "loss on the English text at step 0" in printed and "wrote" in printed
    assert main(["ablate", "--collect", str(grid_dir / "notes")]) == 2
    assert "no study in its subfolders" in capsys.readouterr().err
    assert main(["ablate", "--collect", str(grid_dir), "--out", str(tmp_path / "x")]) == 2
    assert main(["ablate", "--seeds", "2"]) == 2
    assert "--out is required" in capsys.readouterr().err


def test_the_committed_real_model_grid_matches_its_runs_and_the_readme_states_it():
    root = Path(__file__).parents[1]
    folder = root / "docs" / "results" / "ablations" / "smollm2"
    grid = json.loads((folder / "summary.json").read_text())
    cells = grid["cells"]
    assert {(c["layers"], c["lr"]) for c in cells} >= {(8, 0.01), (8, 0.03), (30, 0.01), (30, 0.03)}
    for cell in cells:
        assert cell["settings"]["base"] == "smollm2" and cell["machine"]["vector_unit"] and cell["command"]
        runs = ablate.read_runs(folder / cell["name"] / "runs.jsonl")
        table = ablate.variant_stats(runs, VARIANTS)
        assert set(cell["variants"]) == set(VARIANTS)
        for v, row in cell["variants"].items():
            assert row["seeds"] >= 3
            for key in ("heldout_accuracy", "early_loss", "knowledge_kept", "text_loss_step0", "text_loss_final"):
                assert key in row
            assert {k: x for k, x in row.items() if k not in ablate.GRID_ALIASES} == table[v]  # the runs say so
        assert all(r["text_loss_step0"] == cell["base_knowledge"]["corpus_loss"]
                   for r in runs if r["variant"] == "zero_init")  # Eq. 7 on the real model: the base exactly
    readme = (root / "README.md").read_text()
    block = readme.split("<!-- smollm2-grid:start -->\n")[1].split("<!-- smollm2-grid:end -->")[0]
    assert block == "".join(f"- {line}\n" for line in ablate.grid_sentences(grid))
