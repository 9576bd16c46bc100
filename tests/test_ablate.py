"""The ablation runner: the three variants at step 0, the knowledge probe, output format, resume."""
import json

import numpy as np
import pytest
import torch

from adapterlab.adapter import adapted_layers
from adapterlab.gates import GateLog
from adapterlab.studies import ablate
from adapterlab.worlds import tinyworld as tw
from dataclasses import replace

from adapterlab.studies.ablate import AblationConfig, study_adapter, study_train

pytestmark = pytest.mark.usefixtures("one_thread")


def budget(**changes):
    return replace(study_train(), **{**dict(steps=3, batch_size=8, warmup_steps=1), **changes})


FAST = dict(seeds=2, variants=("zero_init", "ungated"), train=budget(), adapter=replace(study_adapter(), layers=2),
            early_steps=2, probe_docs=4)


def read_base(folder):
    """The conftest's base, frozen, on the CPU (as tinyworld.load_base gives the cached one)."""
    from adapterlab.io.weights import read_llama

    return read_llama(folder, device="cpu").requires_grad_(False)


@pytest.fixture(scope="module")
def small_world(small_base):
    """The conftest's small random base (it knows nothing) with the world its tokenizer was made from."""
    world = tw.make_world(0)
    train, heldout = tw.instruction_set(world)
    corpus = tw.pretrain_corpus(world, passes=2)
    return world, train, heldout[:10], corpus, small_base / "base"


def bench_for(small_world, config, load_base=None):
    world, train, heldout, corpus, folder = small_world
    load_base = load_base or (lambda: read_base(folder))
    return ablate.make_bench(world, load_base().tokenizer, train, heldout, corpus, config, load_base)


# ---------------------------------------------------------------------------- the variants at step 0
def test_zero_init_is_the_base_bit_for_bit_random_and_ungated_are_not(small_world):
    config = AblationConfig(**{**FAST, "variants": ("zero_init", "random_init", "ungated")})
    bench = bench_for(small_world, config)
    base = bench.load_base()
    with torch.no_grad():
        reference = base(bench.probe_tokens)
        for variant, same in (("zero_init", True), ("random_init", False), ("ungated", False)):
            model = ablate.attach(bench.load_base(), config, variant, seed=0)
            assert torch.equal(model(bench.probe_tokens), reference) is same, variant


def test_scales_multiply_the_random_draws(small_world):
    bench = bench_for(small_world, AblationConfig(**FAST))
    one = ablate.attach(bench.load_base(), AblationConfig(**FAST), "random_init", seed=0)
    big = ablate.attach(bench.load_base(), AblationConfig(**FAST, gate_scale=3.0, prompt_scale=0.5), "random_init", seed=0)
    a, b = one.layers[-1].attention.adapter, big.layers[-1].attention.adapter
    assert torch.allclose(b.gate, 3 * a.gate) and torch.allclose(b.prompt, 0.5 * a.prompt)
    zero = ablate.attach(bench.load_base(), AblationConfig(**FAST, gate_scale=3.0), "zero_init", seed=0)
    assert torch.count_nonzero(zero.layers[-1].attention.adapter.gate) == 0


def test_attention_share_is_zero_for_zero_gates_and_a_real_share_when_ungated(small_world):
    bench = bench_for(small_world, AblationConfig(**FAST))
    zero = ablate.attach(bench.load_base(), AblationConfig(**FAST), "zero_init", seed=0)
    none = ablate.attach(bench.load_base(), AblationConfig(**FAST), "ungated", seed=0)
    assert ablate.attention_share(zero, bench.probe_tokens) == 0.0
    assert 0.0 < ablate.attention_share(none, bench.probe_tokens) < 1.0
    random = ablate.attach(bench.load_base(), AblationConfig(**FAST), "random_init", seed=0)
    share, by_head = ablate.attention_shares(random, bench.probe_tokens)
    g = torch.stack([random.layers[i].attention.adapter.gate_value().detach().abs().reshape(-1)
                     for i in adapted_layers(random)])  # (L, H)
    assert torch.allclose(by_head, g / (1 + g)) and share == pytest.approx((g / (1 + g)).mean().item(), rel=1e-6)


def test_an_ungated_model_refuses_a_gated_adapter_file_by_name(small_world, tmp_path):
    from adapterlab import load_adapter, remove_adapter, save_adapter

    bench = bench_for(small_world, AblationConfig(**FAST))
    save_adapter(ablate.attach(bench.load_base(), AblationConfig(**FAST), "random_init", seed=0), tmp_path / "gated")
    ungated = ablate.attach(bench.load_base(), AblationConfig(**FAST), "ungated", seed=0)
    with pytest.raises(ValueError, match=r"ungated prompts in layer\(s\) \[\d+, \d+\].*add_ungated_prompts.*remove_adapter"):
        load_adapter(ungated, tmp_path / "gated")
    load_adapter(remove_adapter(ungated), tmp_path / "gated")  # as the message says
    assert all(ungated.layers[i].attention.adapter.gate is not None for i in adapted_layers(ungated))
    save_adapter(ablate.attach(bench.load_base(), AblationConfig(**FAST), "ungated", seed=1), tmp_path / "ungated")
    with pytest.raises(ValueError, match=r"holds ungated prompts.*has no adapter.*add_ungated_prompts\(model, "
                                         r"AdapterConfig\(prompt_len=10, layers=2\)\)"):
        load_adapter(bench.load_base(), tmp_path / "ungated")


# ---------------------------------------------------------------------------- the knowledge probe
def test_knowledge_probe_tells_a_base_that_knows_from_one_that_does_not(small_world):
    """The cached tiny-world base completes most facts in its pretraining words; a random model none."""
    knows = tw.load_base(progress=False)
    world, _, heldout = tw.load_world()
    _, corpus, _, _ = tw.build_world(tw.Recipe())
    config = AblationConfig(**{**FAST, "probe_docs": 8})
    bench = ablate.make_bench(world, knows.tokenizer, heldout * 2, heldout, corpus, config, lambda: knows)
    knew = ablate.knowledge(knows, bench)
    from adapterlab import Llama
    from adapterlab.model import init_weights

    blank = init_weights(Llama(knows.config), seed=1).eval()  # the same shape, randomly initialised
    blank.tokenizer = knows.tokenizer
    did_not = ablate.knowledge(blank, bench)
    assert knew["fact_accuracy"] > 0.5 and did_not["fact_accuracy"] < 0.1
    assert knew["corpus_loss"] < 1.5 < did_not["corpus_loss"]


# ---------------------------------------------------------------------------- the runner's files
def test_runner_writes_runs_summary_and_plot(small_world, tmp_path):
    config = AblationConfig(**FAST)
    summary = ablate.run_ablation(tmp_path, config, progress=False, command="test", bench=bench_for(small_world, config))
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert [(r["variant"], r["seed"]) for r in runs] == [("zero_init", 0), ("ungated", 0), ("zero_init", 1), ("ungated", 1)]
    n_layers, n_heads = read_base(small_world[4]).config.n_layers, read_base(small_world[4]).config.n_heads
    for r in runs:
        assert len(r["losses"]) == 3 and r["eval_history"][-1]["step"] == 3
        assert set(r["knowledge_before"]) == set(r["knowledge_after"]) == {"corpus_loss", "fact_accuracy"}
        assert r["gate_log"][0]["step"] == 0 and r["gate_log"][-1]["step"] == 3
        assert (r["gate_log"][0]["gate_abs"] == 0.0) if r["variant"] == "zero_init" else r["gate_log"][0]["gate_abs"] is None
        assert r["attention_share"] == r["gate_log"][-1]["attention_share"] and "prompt_share" not in r
        for g in r["gate_log"]:  # per adapted layer (the top 2) and head
            shares = np.array(g["attention_share_by_head"])
            assert shares.shape == (2, n_heads) and shares.mean() == pytest.approx(g["attention_share"], rel=1e-5)
            if r["variant"] == "zero_init":
                assert g["layers"] == [n_layers - 2, n_layers - 1] and np.array(g["gates"]).shape == (2, n_heads)
                assert np.abs(g["gates"]).mean() == pytest.approx(g["gate_abs"], rel=1e-5, abs=1e-12)
            else:
                assert g["layers"] == [] and g["gates"] == []  # no gate to record
    zero_log = GateLog.from_records(runs[0]["gate_log"])  # adapterlab.gates reads a gated run's log
    assert zero_log.gates.shape == (len(runs[0]["gate_log"]), 2, n_heads) and not zero_log.gates[0].any()
    assert zero_log.gates[-1].any(), "the zero-init gates moved in 3 steps"
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["variants"].keys() == {"zero_init", "ungated"} and on_disk["command"] == "test"
    for v in ("zero_init", "ungated"):
        row = on_disk["variants"][v]
        assert row["seeds"] == 2
        for metric in ("heldout_accuracy", "early_loss", "pretrain_loss_after"):
            lo, hi = row[metric]["ci95"]
            assert lo <= row[metric]["mean"] <= hi and row[metric]["std"] >= 0
    assert {"date", "machine", "settings"} <= set(on_disk)
    assert {"cpu", "vector_unit", "threads", "torch", "python"} <= set(on_disk["machine"])
    assert summary["variants"]["zero_init"]["knowledge_at_init"]["mean"] == runs[0]["knowledge_before"]["corpus_loss"]
    assert (tmp_path / "ablation.png").stat().st_size > 10_000
    assert "ungated" in ablate.format_table(summary)


def test_a_killed_study_resumes_with_only_the_missing_runs(small_world, tmp_path):
    config = AblationConfig(**FAST)
    folder = small_world[4]
    calls = []

    def dies_on_the_third_run():
        calls.append(1)
        if len(calls) == 4:  # (the bench loads once for the tokenizer) the third run is killed midway
            raise KeyboardInterrupt
        return read_base(folder)

    with pytest.raises(KeyboardInterrupt):
        ablate.run_ablation(tmp_path / "a", config, progress=False, plot=False,
                            bench=bench_for(small_world, config, dies_on_the_third_run))
    first = ablate.read_runs(tmp_path / "a" / "runs.jsonl")
    assert [(r["variant"], r["seed"]) for r in first] == [("zero_init", 0), ("ungated", 0)]

    loads = []
    bench = bench_for(small_world, config, lambda: loads.append(1) or read_base(folder))
    loads.clear()
    ablate.run_ablation(tmp_path / "a", config, progress=False, plot=False, bench=bench)
    assert len(loads) == 2, "only the two missing runs are done"
    resumed = ablate.read_runs(tmp_path / "a" / "runs.jsonl")
    ablate.run_ablation(tmp_path / "b", config, progress=False, plot=False, bench=bench_for(small_world, config))
    straight = ablate.read_runs(tmp_path / "b" / "runs.jsonl")
    strip = lambda runs: [{k: v for k, v in r.items() if k != "seconds"} for r in runs]  # noqa: E731
    assert strip(resumed) == strip(straight), "a killed and resumed study equals one run straight through"


def test_resume_refuses_other_settings_and_broken_lines(small_world, tmp_path):
    config = AblationConfig(**{**FAST, "seeds": 1, "variants": ("zero_init",)})
    ablate.run_ablation(tmp_path, config, progress=False, plot=False, bench=bench_for(small_world, config))
    with pytest.raises(ValueError, match="other settings.*lr"):
        ablate.run_ablation(tmp_path, AblationConfig(**{**FAST, "seeds": 1, "train": budget(lr=0.1)}), progress=False)
    with open(tmp_path / "runs.jsonl", "a") as f:
        f.write('{"variant": "zero_init", "se')
    with pytest.raises(ValueError, match="line 2: not JSON"):
        ablate.run_ablation(tmp_path, config, progress=False)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(variants=("zero_init", "frozen")), "variants"),
    (dict(variants=()), "variants"),
    (dict(seeds=0), "seeds"),
    (dict(train=dict(steps=-1)), "steps"),
    (dict(train=dict(lr=0.0)), "lr"),
    (dict(gate_scale=float("nan")), "gate_scale"),
    (dict(train=dict(steps=5), early_steps=10), "early_steps"),
    (dict(train=dict(batch_size=8), train_records=4), "train_records"),
])
def test_bad_settings_are_named(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        if "train" in kwargs:
            kwargs = {**kwargs, "train": budget(**{"steps": 40, **kwargs["train"]})}
        AblationConfig(**kwargs)


def test_old_names_are_read_as_todays():
    """Committed studies say "zero", "random", "none" and "knowledge_kept": they load under today's names."""
    from pathlib import Path

    runs, summary = ablate.read_study(Path(__file__).parents[1] / "docs" / "results" / "ablations" / "main")
    assert {r["variant"] for r in runs} == set(summary["variants"]) == set(ablate.VARIANTS)
    assert all("pretrain_loss_after" in r and "knowledge_kept" not in r for r in runs)
    assert "knowledge_kept" not in summary["variants"]["zero_init"]
    assert all("attention_share" in r and "prompt_share" not in r for r in runs)  # the ablation's old "prompt_share"
    assert all("attention_share" in g and "prompt_share" not in g for r in runs for g in r["gate_log"])
    assert "attention_share" in summary["variants"]["zero_init"] and "prompt_share" not in summary["variants"]["zero_init"]
    assert AblationConfig(variants=("zero", "random", "none")).variants == tuple(ablate.VARIANTS)
    table = ablate.format_table(summary)
    assert "zero-init gates" in table and "ungated (one softmax)" in table


def test_stats_mean_std_and_interval():
    s = ablate.stats([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == 1.0 and s["n"] == 3
    assert s["ci95"] == pytest.approx([2 - 4.303 / 3 ** 0.5, 2 + 4.303 / 3 ** 0.5])
    assert ablate.stats([5.0])["ci95"] is None


def test_compare_pairs_seeds_and_says_which_way():
    runs = [{"variant": v, "seed": s, "heldout_accuracy": acc, "early_loss": loss}
            for s, (za, ra) in enumerate([(0.5, 0.3), (0.6, 0.35), (0.55, 0.4)])
            for v, acc, loss in (("zero_init", za, 1.0 + s), ("random_init", ra, 1.0 + s + 0.01 * (s - 1)))]
    acc = ablate.compare(runs, "heldout_accuracy", "zero_init", "random_init")
    assert acc["verdict"] == "better" and acc["difference"]["mean"] == pytest.approx(0.2)
    assert ablate.compare(runs, "heldout_accuracy", "random_init", "zero_init")["verdict"] == "worse"
    assert ablate.compare(runs, "early_loss", "zero", "random")["verdict"] == "no clear difference"  # old names
    assert "zero-init gates beats random-init gates on held-out accuracy" in ablate.sentence(acc)
    with pytest.raises(ValueError, match="at least 2 seeds"):
        ablate.compare(runs[:2], "heldout_accuracy")


def synthetic_runs(seeds, zero_acc=0.5, random_acc=0.3):
    """Runs of zero_init and random_init: zero-init answers more in every seed, the rest alike."""
    return [{"variant": v, "seed": s, "seconds": 1.0, "knowledge_before": {"corpus_loss": 0.5, "fact_accuracy": 0.9},
             **{m: 1.0 + 0.1 * s for m in ablate.METRICS},
             "heldout_accuracy": (zero_acc if v == "zero_init" else random_acc) + 0.01 * s * s}
            for s in range(seeds) for v in ("zero_init", "random_init")]


def test_report_says_what_columns_mean_gives_the_verdicts_and_warns_below_five_seeds():
    config = AblationConfig(seeds=2, variants=("zero_init", "random_init"))
    summary = ablate.summarize(synthetic_runs(2), config, command="test")
    text = ablate.report(summary)
    assert text.startswith(ablate.format_table(summary))  # the table first, as it always was
    assert "held-out acc         share of held-out questions answered right after training (higher is better)" in text
    assert "mean training loss of the first 10 steps (lower is better" in text
    assert "corpus loss after    loss on the base's pretraining text after training (lower is better" in text
    assert ("- zero-init gates beats random-init gates on held-out accuracy: 0.505 vs 0.305 (paired difference 0.200, "
            "95% interval [0.200, 0.200], 2 seeds)") in text
    assert "- zero-init gates is not clearly different from random-init gates on early training loss" in text
    assert "warning: with 2 seeds the table can look like a win the 5-seed study refutes" in text
    assert [c["verdict"] for c in summary["comparisons"]] == ["no clear difference", "better", "no clear difference",
                                                              "no clear difference"]  # ablate.VERDICT_METRICS' order
    five = ablate.report(ablate.summarize(synthetic_runs(5), replace(config, seeds=5)))
    assert "warning" not in five and "5 seeds)" in five
    one = ablate.report(ablate.summarize(synthetic_runs(1), replace(config, seeds=1)))
    assert "no paired comparison" in one and "with 1 seed the table" in one


def test_report_of_a_committed_study_reads_its_old_summary():
    from pathlib import Path

    runs, summary = ablate.read_study(Path(__file__).parents[1] / "docs" / "results" / "ablations" / "main")
    assert "comparisons" not in summary  # written before the verdicts were stored: computed from the runs
    summary["comparisons"] = ablate.comparisons(runs)
    text = ablate.report(summary)
    # the committed README's sentence, from the same runs
    assert ("- zero-init gates loses to random-init gates on early training loss: 1.436 vs 1.155 (paired difference "
            "0.281, 95% interval [0.121, 0.440], 5 seeds)") in text
    assert "ungated (one softmax) on held-out accuracy" in text and "warning" not in text


# ---------------------------------------------------------------------------- the command line
def test_cli_maps_flags_to_the_study_and_prints_the_table(monkeypatch, tmp_path, capsys):
    from adapterlab.cli import main

    seen = {}

    def fake_run(out, config, progress, command, threads):
        seen.update(out=out, config=config, progress=progress, threads=threads)
        runs = [{"variant": v, "seed": s, "seconds": 1.0, "knowledge_before": {"corpus_loss": 0.5, "fact_accuracy": 1.0},
                 **{m: 0.5 + s for m in ablate.METRICS}} for v in config.variants for s in range(config.seeds)]
        return ablate.summarize(runs, config, command)

    monkeypatch.setattr(ablate, "run_ablation", fake_run)
    code = main(["ablate", "--out", str(tmp_path), "--seeds", "2", "--steps", "40", "--variants", "zero,ungated",
                 "--lr", "0.01", "--gate-scale", "3", "--train-records", "64", "--no-progress"])
    assert code == 0
    c = seen["config"]
    assert (c.seeds, c.train.steps, c.variants, c.train.lr, c.gate_scale, c.train_records) == (
        2, 40, ("zero_init", "ungated"), 0.01, 3.0, 64)
    printed = capsys.readouterr().out
    assert "zero-init gates" in printed and "(higher is better)" in printed
    assert "- zero-init gates is not clearly different from ungated (one softmax) on held-out accuracy" in printed
    assert "warning: with 2 seeds the table can look like a win the 5-seed study refutes" in printed


@pytest.mark.parametrize("argv,needle", [
    (["--variants", "zero,frozen"], "--variants"),
    (["--seeds", "0"], "--seeds"),
    (["--lr", "-1"], "--lr"),
    (["--steps", "4", "--train-records", "3"], "--train-records must be at least one batch"),
])
def test_cli_bad_flags_exit_2_and_name_the_flag(argv, needle, tmp_path, capsys):
    from adapterlab.cli import main

    assert main(["ablate", "--out", str(tmp_path)] + argv) == 2
    assert needle in capsys.readouterr().err


def test_plot_regimes_draws_one_panel_per_metric(tmp_path):
    runs = [{"variant": v, "seed": s, **{m: 0.1 * s + i for i, m in enumerate(ablate.METRICS)}}
            for v in ("zero_init", "random_init") for s in range(3)]
    fig = ablate.plot_regimes({"lr 0.01": runs, "lr 0.05": runs[:3]}, tmp_path / "regimes.png")
    assert len(fig.axes) == 3 and (tmp_path / "regimes.png").stat().st_size > 5_000
