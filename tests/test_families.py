"""The comparison harness of the encoder families (adapterlab.studies.families), on tiny random encoders
and tiny task sets: what each method trains, the zero-init start, the study's files and resuming."""
import copy
import json
from pathlib import Path

import pytest
import torch

from adapterlab.studies import families as fam
from adapterlab.adapter import AdapterConfig, trainable_parameters
from adapterlab.encoders.transformer import TextEncoder, TextEncoderConfig, ViT, ViTConfig, init_encoder_weights, set_head

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(dim=32, n_layers=3, n_heads=2, mlp_hidden=64)
VIT_TASKS = ("digits", "noisy_shapes", "count")  # one per VTAB group
VIT_SIZES = {"n_train": 48, "n_val": 16, "n_test": 24}


def tiny_vit(seed: int = 0) -> ViT:
    return init_encoder_weights(ViT(ViTConfig(**SMALL)), seed=seed, std=0.2).eval()


def tiny_text(vocab_size: int = 96, seed: int = 0) -> TextEncoder:
    config = TextEncoderConfig(vocab_size=vocab_size, max_seq_len=96, **SMALL)
    return init_encoder_weights(TextEncoder(config), seed=seed, std=0.2).eval()


@pytest.fixture(scope="module")
def vit_bench():
    return fam.vit_bench(VIT_TASKS, sizes=VIT_SIZES, base=tiny_vit())


def tiny_study(steps: int = 3, **changes) -> fam.StudyConfig:
    settings = dict(family="vit", tasks=VIT_TASKS, seeds=2, train=fam.study_train(steps=steps, batch_size=16, warmup_steps=1),
                    adapter=AdapterConfig(prompt_len=3, layers=2), lr_grids={m: (1e-3, 3e-2) for m in fam.ALL_METHODS},
                    search_tasks=("digits",))
    return fam.StudyConfig(**{**settings, **changes})


# --------------------------------------------------------------------------- what each method trains
def expected_trainable(base_names: list[str], method: str, n_layers: int, layers: int) -> set[str]:
    """The parameter names each method must train, written out from the method's definition."""
    head = {"head.weight", "head.bias"}
    top = range(n_layers - layers, n_layers)
    if method == "zero_init":
        return head | {f"layers.{i}.attention.adapter.{p}" for i in top for p in ("prompt", "gate")}
    if method == "ungated":
        return head | {f"layers.{i}.attention.adapter.prompt" for i in top}
    if method == "full":
        return set(base_names)
    if method == "bitfit":
        return head | {n for n in base_names if n.endswith(".bias") or n == "bias"}
    if method == "linear":
        return head
    if method == "input_prompts":
        return head | {"input_prompts"}
    if method == "lora":
        return head | {f"layers.{i}.attention.{w}.lora_{ab}" for i in range(n_layers) for w in ("wq", "wv")
                       for ab in ("A", "B")}
    raise AssertionError(method)


@pytest.mark.parametrize("family, method", [(f, m) for f in fam.FAMILIES for m in fam.METHODS[f]])
def test_prepare_trains_exactly_the_methods_parameters(family, method):
    model = set_head(tiny_vit() if family == "vit" else tiny_text(), 5, seed=1)
    base_names = [n for n, _ in model.named_parameters()]
    fam.prepare(model, method, prompt_len=3, layers=2, seed=0)
    trained = {n for n, _ in trainable_parameters(model)}
    assert trained == expected_trainable(base_names, method, SMALL["n_layers"], 2)
    frozen_weights = [n for n, p in model.named_parameters() if n.endswith("attention.wk.weight")]
    assert frozen_weights and (method == "full") == all(dict(model.named_parameters())[n].requires_grad
                                                         for n in frozen_weights)


@pytest.mark.parametrize("family", fam.FAMILIES)
def test_zero_init_and_lora_start_exactly_as_the_frozen_model_and_ungated_prompts_do_not(family):
    torch.manual_seed(0)
    base = set_head(tiny_vit() if family == "vit" else tiny_text(), 4, seed=1)
    if family == "vit":
        inputs = (torch.rand(3, 3, 32, 32),)
    else:
        mask = torch.ones(3, 20, dtype=torch.bool)
        mask[0, 15:] = False  # padding in one row
        inputs = (torch.randint(0, 96, (3, 20)), mask)
    with torch.no_grad():
        frozen = base(*inputs)
        outputs = {m: fam.prepare(copy.deepcopy(base), m, prompt_len=3, layers=3, seed=0)(*inputs)
                   for m in ("zero_init", "lora", "ungated")}
    assert torch.equal(outputs["zero_init"], frozen)  # tanh(0) = 0: the gated term adds exactly nothing
    assert torch.equal(outputs["lora"], frozen)  # B = 0
    assert (outputs["ungated"] - frozen).abs().max() > 1e-3  # the prompts take attention at once


def test_prepare_rejects_an_unknown_method():
    with pytest.raises(ValueError, match="method must be one of"):
        fam.prepare(tiny_vit(), "adapter_v2")


# --------------------------------------------------------------------------- the fit loop
def test_data_order_is_seeded_and_shows_every_example_once_per_epoch():
    order = fam.data_order(10, 3, steps=7, seed=5)  # 3 batches per epoch (one example dropped each epoch)
    assert [len(b) for b in order] == [3] * 7
    for epoch in range(2):
        seen = torch.cat(order[3 * epoch: 3 * epoch + 3]).tolist()
        assert len(set(seen)) == 9
    assert all(torch.equal(a, b) for a, b in zip(order, fam.data_order(10, 3, steps=7, seed=5)))
    assert not all(torch.equal(a, b) for a, b in zip(order, fam.data_order(10, 3, steps=7, seed=6)))
    with pytest.raises(ValueError, match="batch_size=16 is larger than the 10"):
        fam.data_order(10, 16, steps=1, seed=0)


def test_fit_learns_and_logs_the_gates_of_a_gated_model_only(vit_bench, tmp_path):
    task = vit_bench.tasks["digits"]
    examples = fam.training_examples(task, final=False)
    logs = {}
    for method in ("zero_init", "ungated"):
        model = fam.prepare(set_head(copy.deepcopy(vit_bench.base), task.n_out, 0), method, prompt_len=3, layers=2)
        losses = fam.fit(model, task, examples, steps=12, batch_size=16, lr=3e-2, warmup_steps=1, weight_decay=0.0,
                         seed=0, run_dir=tmp_path / method, plot=False)
        assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])  # it learns the training set
        logs[method] = tmp_path / method / "gates.jsonl"
    records = [json.loads(line) for line in logs["zero_init"].read_text().splitlines()]
    assert records[0]["step"] == 0 and all(g == 0.0 for row in records[0]["gates"] for g in row)
    assert records[-1]["step"] == 12 and any(g != 0.0 for row in records[-1]["gates"] for g in row)
    assert len(records[0]["gates"]) == 2  # the two adapted layers
    assert not logs["ungated"].exists()  # no gate to record


def test_training_examples_of_the_final_runs_are_train_and_val(vit_bench):
    task = vit_bench.tasks["count"]
    images, labels = fam.training_examples(task, final=True)
    assert len(labels) == VIT_SIZES["n_train"] + VIT_SIZES["n_val"]
    assert torch.equal(images[VIT_SIZES["n_train"]:], task.examples("val")[0])


# --------------------------------------------------------------------------- the study
def recompute_average(runs: list[dict], method: str, groups: dict) -> list[float]:
    """Per seed: the mean over the VTAB groups of the mean accuracy over each group's tasks."""
    per_seed = {}
    for r in runs:
        if r["phase"] == "final" and r["method"] == method:
            per_seed.setdefault(r["seed"], {}).setdefault(groups[r["task"]], []).append(r["scores"]["accuracy"])
    return [sum(sum(v) / len(v) for v in g.values()) / len(g) for _, g in sorted(per_seed.items())]


def test_the_study_writes_metrics_of_the_promised_form(vit_bench, tmp_path):
    config = tiny_study()
    results = fam.run_study(tmp_path, config, bench=vit_bench, progress=False, command="test")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert list(metrics) == ["methods"] and list(metrics["methods"]) == list(fam.METHODS["vit"])
    runs = fam.read_runs(tmp_path / "runs.jsonl")
    assert len(runs) == 6 * 2 + 6 * 3 * 2  # search: 6 methods x 2 rates x 1 task; final: 6 x 3 tasks x 2 seeds
    groups = {t: vit_bench.tasks[t].group for t in VIT_TASKS}
    for method, row in metrics["methods"].items():
        for key in ("natural", "specialized", "structured", "average"):
            assert 0.0 <= row[key] <= 1.0 and row[f"{key}_std"] >= 0.0
        assert set(row["tasks"]) == set(VIT_TASKS)
        assert isinstance(row["trainable_params"], int) and row["trainable_params"] > 0
        averages = recompute_average(runs, method, groups)
        assert row["average"] == pytest.approx(sum(averages) / 2)
        assert row["average_std"] == pytest.approx(torch.tensor(averages).std().item())
        search = {r["lr"]: r["scores"]["accuracy"] for r in runs if r["phase"] == "search" and r["method"] == method}
        assert row["lr"] == results["chosen_lr"][method] == max(search, key=search.get)
    p = metrics["methods"]
    assert p["linear"]["trainable_params"] < p["zero_init"]["trainable_params"] < p["full"]["trainable_params"]
    assert p["zero_init"]["trainable_params"] - p["ungated"]["trainable_params"] == 2 * SMALL["n_heads"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["command"] == "test" and {"platform", "cpu", "vector_unit", "torch", "threads"} <= set(saved["machine"])
    for name in ("table.png", "gates.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_the_study_resumes_and_skips_finished_runs(vit_bench, tmp_path, monkeypatch):
    config = tiny_study(seeds=1, methods=("zero_init", "linear"), lr_grids={"zero_init": (1e-2,), "linear": (1e-2,)})
    first = fam.run_study(tmp_path, config, bench=vit_bench, progress=False)
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 2 + 2 * 3
    calls = []
    real_run_one = fam.run_one
    monkeypatch.setattr(fam, "run_one", lambda *a, **k: calls.append(a[2]) or real_run_one(*a, **k))
    again = fam.run_study(tmp_path, config, bench=vit_bench, progress=False)
    assert calls == [] and again["methods"] == first["methods"]
    (tmp_path / "runs.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # as if killed during the last run
    fam.run_study(tmp_path, config, bench=vit_bench, progress=False)
    last = json.loads(lines[-1])
    assert [c.key for c in calls] == [tuple(last[k] for k in ("phase", "task", "method", "lr", "seed"))]
    with pytest.raises(ValueError, match="other settings.*steps"):
        fam.run_study(tmp_path, tiny_study(seeds=1, methods=("linear",), steps=4), bench=vit_bench, progress=False)


def test_a_text_study_reports_em_and_f1_on_both_squad_versions(tmp_path):
    from adapterlab.worlds.textqa import tiny_world_vocab

    vocab = tiny_world_vocab()
    base = tiny_text(vocab_size=vocab.size)
    base.vocab = vocab
    bench = fam.roberta_bench(sizes={"train": 16, "val": 8, "test": 12}, base=base)
    config = fam.StudyConfig(family="roberta", methods=("zero_init", "input_prompts"), seeds=1,
                             train=fam.study_train(steps=2, batch_size=8, warmup_steps=1),
                             adapter=AdapterConfig(prompt_len=3, layers=2), lrs={"zero_init": 1e-2, "input_prompts": 1e-2})
    fam.run_study(tmp_path, config, bench=bench, progress=False)
    methods = json.loads((tmp_path / "metrics.json").read_text())["methods"]
    for row in methods.values():
        for key in ("squad1_em", "squad1_f1", "squad2_em", "squad2_f1"):
            assert 0.0 <= row[key] <= 1.0 and f"{key}_std" in row
        assert row["squad1_em"] <= row["squad1_f1"] and row["squad2_em"] <= row["squad2_f1"]
    assert not any(r["phase"] == "search" for r in fam.read_runs(tmp_path / "runs.jsonl"))  # given rates: no search


@pytest.mark.parametrize("changes, message", [
    (dict(family="bert"), "family must be one of"),
    (dict(methods=("input_prompts",)), "methods for vit"),
    (dict(tasks=("digits", "clouds")), "tasks for vit"),
    (dict(search_tasks=("count",), tasks=("digits",)), "must be among tasks"),
    (dict(lrs={"zero_init": 1e-2}), "no learning rate for"),
    (dict(train=fam.study_train(warmup_steps=300)), "warmup_steps must be between 0 and steps=200"),
])
def test_study_config_names_what_is_wrong(changes, message):
    with pytest.raises(ValueError, match=message):
        fam.StudyConfig(**{**dict(family="vit"), **changes})


def test_demo_rates_are_one_table_for_every_method():
    for family in fam.FAMILIES:
        config = fam.demo_config(family)
        assert config.lrs == {m: fam.DEFAULT_LR[family][m] for m in fam.METHODS[family]} and config.seeds == 1


@pytest.mark.parametrize("family", fam.FAMILIES)
def test_the_committed_study_is_the_study_the_code_describes(family):
    """docs/results/families/<family>: run with STUDY's budget and LR_GRIDS, on every task, and the
    demo's rates (DEFAULT_LR) are the ones its search chose."""
    results = fam.read_results(Path(__file__).parents[1] / "docs" / "results" / "families" / family)
    settings, study = results["settings"], fam.study_config(family)
    assert {k: settings[k] for k in study.run_settings()} == study.run_settings() and settings["seeds"] == study.seeds
    assert list(results["methods"]) == list(fam.METHODS[family])  # "ungated_prompts" there is "ungated" here
    assert tuple(settings["tasks"]) == fam.task_names(family)
    assert {m: tuple(g) for m, g in settings["lr_grids"].items()} == {m: fam.LR_GRIDS[m] for m in fam.METHODS[family]}
    assert results["chosen_lr"] == fam.DEFAULT_LR[family]
