"""Zero-init attention beyond LLaMA: a ViT on VTAB-style tasks and a RoBERTa-style encoder on
SQuAD-style questions, against the other ways of tuning a frozen model.

``adapterlab demo vit`` / ``adapterlab demo roberta`` and ``adapterlab families`` call :func:`run_demo`
and :func:`run_study`.

The encoders (:mod:`adapterlab.encoders.transformer`) carry the same attention slot as LLaMA, so the gated
prompt term of Eq. 7 is not written again here: ``zero_init`` attaches the adapter of
:mod:`adapterlab.adapter` unchanged. What each method trains (the task's new head
always trains, as on VTAB and SQuAD):

    method            trains besides the head                                   known as
    zero_init         K prompts + one gate per head in the top L layers (Eq. 7)  LLaMA-Adapter
    ungated           K prompts in the top L layers, in the tokens' softmax      VPT-deep, P-tuning v2
    full              every weight                                               full fine-tuning
    bitfit            every bias                                                 BitFit (bias tuning)
    linear            nothing (ViT)                                              linear probe
    input_prompts     K prompt vectors before the first layer (text)             prompt tuning
    lora              rank-8 updates of W_q and W_v in every layer               LoRA

One study, per family:

    1. learning-rate search: each method, each rate of its small grid, 1 seed, on the search tasks;
       trained on the train split, scored on the val split; the best mean score picks the rate
    2. final runs: each method at its rate, ``seeds`` seeds, every task; trained on train + val,
       scored on test
    3. summary: per method the mean and std over seeds of every score (ViT: per task, per VTAB group -
       the mean over the group's tasks - and the average over the groups; RoBERTa: EM and F1 on the
       v1.1- and v2.0-style sets), and the trainable parameters

Every run gets a fresh copy of the frozen base, the same steps, batch and schedule (AdamW, linear
warm-up, cosine), a data order drawn from its seed, and one thread. The study runs on
:mod:`adapterlab.studies.harness`: ``DIR/runs.jsonl`` gets one line per finished run, so a study
killed midway redoes only the run it was in. A run with gates writes ``DIR/runs/<run>/gates.jsonl`` (read by :mod:`adapterlab.gates`).
The study writes ``metrics.json`` (the table), ``results.json`` (the table, the search, the
command, date and machine), ``table.png`` and ``gates.png`` (the gates of one zero-init run).
"""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..adapter import AdapterConfig, add_adapter, count_trainable
from ..io.files import atomic_write_text, cpu_threads, default_threads
from ..gates import GateRecorder, gated_layers, save_plot
from ..train import TrainConfig, train
from .variants import add_ungated_prompts
from . import harness
from .harness import method_name, read_runs

FAMILIES = ("vit", "roberta")
METHODS = {
    "vit": ("zero_init", "ungated", "full", "bitfit", "linear", "lora"),
    "roberta": ("zero_init", "ungated", "full", "bitfit", "input_prompts", "lora"),
}
ALL_METHODS = ("zero_init", "ungated", "full", "bitfit", "linear", "input_prompts", "lora")
LABELS = {"zero_init": "zero-init gated prompts", "ungated": "ungated prompts (VPT-deep / P-tuning v2)",
          "full": "full fine-tuning", "bitfit": "bias tuning (BitFit)", "linear": "linear probe",
          "input_prompts": "input prompt tuning", "lora": "LoRA (W_q, W_v)"}
GROUPS = ("natural", "specialized", "structured")  # VTAB's groups, in the paper's table order
QA_TASKS = {"squad1": "1.1", "squad2": "2.0"}  # task name -> SQuAD version
LORA_RANK, LORA_ALPHA = 8, 16.0
RUNS_NAME, METRICS_NAME, RESULTS_NAME, TABLE_NAME, GATES_PLOT = (
    "runs.jsonl", "metrics.json", "results.json", "table.png", "gates.png")

# Learning-rate grids of the search (a factor of about 3 between neighbours, around where each
# kind of parameter usually trains: new prompts and heads fast, pretrained weights slowly).
LR_GRIDS = {
    "zero_init": (3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
    "ungated": (3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
    "full": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
    "bitfit": (3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
    "linear": (3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
    "input_prompts": (3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
    "lora": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
}

# The learning rate of each method, as chosen by the committed study's search (the demos use them):
# docs/results/families/vit/results.json and docs/results/families/roberta/results.json, "chosen_lr".
DEFAULT_LR = {
    "vit": {"zero_init": 3e-2, "ungated": 1e-1, "full": 3e-3, "bitfit": 3e-2, "linear": 1e-2, "lora": 1e-2},
    "roberta": {"zero_init": 1e-1, "ungated": 1e-1, "full": 1e-3, "bitfit": 3e-2, "input_prompts": 3e-2,
                "lora": 1e-2},
}


# --------------------------------------------------------------------------- methods
def prepare(model: nn.Module, method: str, *, prompt_len: int = 10, layers: int = 4, seed: int = 0) -> nn.Module:
    """Put ``model`` (an encoder with its task head already set) in the state ``method`` trains
    from, in place: freeze everything, attach what the method adds, unfreeze what it trains and the
    head. Returns the model. The table in the module docstring says what trains."""
    method = method_name(method)  # older spelling: "ungated_prompts"
    if method not in ALL_METHODS:
        raise ValueError(f"method must be one of {ALL_METHODS}; got {method!r}")
    model.requires_grad_(False)
    before = {name for name, _ in model.named_parameters()}
    if method in ("zero_init", "ungated"):  # Eq. 7's zero gates, or one joint softmax (studies.variants)
        attach_prompts = add_adapter if method == "zero_init" else add_ungated_prompts
        attach_prompts(model, AdapterConfig(prompt_len=prompt_len, layers=layers), seed=seed)
    elif method == "lora":
        from .baselines import add_lora

        add_lora(model, rank=LORA_RANK, alpha=LORA_ALPHA, targets=("wq", "wv"), seed=seed)
    elif method == "input_prompts":
        from ..encoders.transformer import add_input_prompts

        add_input_prompts(model, prompt_len, seed=seed)
    for name, p in model.named_parameters():
        added = name not in before  # prompts, gates, LoRA's A and B
        if added or method == "full" or (method == "bitfit" and name.endswith("bias")):
            p.requires_grad_(True)
    model.head.requires_grad_(True)
    return model


# --------------------------------------------------------------------------- tasks
@dataclass
class ImageTask:
    """A VTAB-style classification task: images float in [0, 1] (N, 3, H, W), labels (N,)."""

    name: str
    group: str
    n_out: int
    splits: dict  # split -> (images, labels)

    def examples(self, split: str) -> tuple[torch.Tensor, ...]:
        return self.splits[split]

    def loss(self, model: nn.Module, batch: tuple) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(model(images), labels)

    @torch.no_grad()
    def score(self, model: nn.Module, split: str, batch: int = 250) -> dict:
        images, labels = self.splits[split]
        right = sum((model(images[s:s + batch]).argmax(-1) == labels[s:s + batch]).sum().item()
                    for s in range(0, len(labels), batch))
        return {"accuracy": right / len(labels)}


@dataclass
class QATask:
    """A SQuAD-style task: records per split, encoded once; scored with the official semantics."""

    name: str
    group: str
    n_out: int
    records: dict  # split -> list of SQuAD records
    encoded: dict  # split -> (tokens, mask, start, end)
    vocab: object
    max_len: int

    def examples(self, split: str) -> tuple[torch.Tensor, ...]:
        return self.encoded[split]

    def loss(self, model: nn.Module, batch: tuple) -> torch.Tensor:
        from ..worlds.textqa import qa_loss

        tokens, mask, start, end = batch
        return qa_loss(model(tokens, mask), start, end, mask)

    @torch.no_grad()
    def score(self, model: nn.Module, split: str) -> dict:
        from ..metrics.squad import evaluate
        from ..worlds.textqa import predict_spans

        result = evaluate(self.records[split], predict_spans(model, self.records[split], self.vocab, self.max_len))
        return {"em": result["exact"] / 100, "f1": result["f1"] / 100}  # fractions, as the ViT's accuracy


def training_examples(task, final: bool) -> tuple[torch.Tensor, ...]:
    """The train split (learning-rate search) or train + val (final runs)."""
    if not final:
        return task.examples("train")
    return tuple(torch.cat([a, b]) for a, b in zip(task.examples("train"), task.examples("val")))


def selection_score(family: str, scores: dict) -> float:
    """The number the learning-rate search maximises: accuracy (ViT) or F1 (RoBERTa)."""
    return scores["accuracy"] if family == "vit" else scores["f1"]


# --------------------------------------------------------------------------- bench
@dataclass
class Bench:
    """What every run of a family shares: the frozen base (copied per run) and the tasks."""

    family: str
    base: nn.Module
    tasks: dict  # name -> ImageTask | QATask
    set_head: Callable[[nn.Module, int, int], nn.Module]
    base_name: str = "given"  # the cached base's folder name (its recipe's hash), or "given"


def vit_bench(task_names: Optional[Sequence[str]] = None, sizes: Optional[dict] = None,
              base: Optional[nn.Module] = None) -> Bench:
    """The cached ViT base (or ``base``) and the VTAB-style tasks (all of them, or ``task_names``);
    ``sizes``: smaller splits for quick tests, e.g. {"n_train": 64, "n_val": 32, "n_test": 32}."""
    sizes = sizes or {}
    from ..encoders.transformer import set_head
    from ..worlds.vtab import TASKS, images_to_float, load_vit_base, make_task

    tasks = {}
    for name in task_names or tuple(TASKS):
        t = make_task(name, seed=0, **sizes)
        splits = {split: (images_to_float(getattr(t, f"{split}_images")), getattr(t, f"{split}_labels").long())
                  for split in ("train", "val", "test")}
        tasks[name] = ImageTask(name, t.group, t.n_classes, splits)
    if base is not None:
        return Bench("vit", base, tasks, set_head)
    from ..worlds.vtab import vit_base_name

    return Bench("vit", load_vit_base(), tasks, set_head, vit_base_name())


def roberta_bench(task_names: Optional[Sequence[str]] = None, sizes: Optional[dict] = None,
                  base: Optional[nn.Module] = None) -> Bench:
    """The cached text encoder (or ``base``, with its ``.vocab``) and the SQuAD-style sets (v1.1- and
    v2.0-style); ``sizes``: smaller splits for quick tests, e.g. {"train": 64, "val": 32, "test": 32}."""
    from ..encoders.transformer import set_head
    from ..worlds.textqa import QA_MAX_LEN, encode_qa, load_text_base, make_squad

    from ..worlds.textqa import text_base_name

    base_name = "given" if base is not None else text_base_name()
    base = base if base is not None else load_text_base()
    vocab = base.vocab
    del base.vocab  # the runs copy the model, not its tokenizer
    tasks = {}
    for name in task_names or tuple(QA_TASKS):
        records = make_squad(version=QA_TASKS[name], seed=0, sizes=sizes)
        encoded = {s: tuple(encode_qa(records[s], vocab, QA_MAX_LEN).values()) for s in ("train", "val")}
        tasks[name] = QATask(name, name, 2, records, encoded, vocab, QA_MAX_LEN)
    return Bench("roberta", base, tasks, set_head, base_name)


def make_bench(family: str, task_names: Optional[Sequence[str]] = None, train_limit: Optional[int] = None) -> Bench:
    """The family's bench; ``train_limit`` keeps at most N training and N validation examples per task."""
    if family == "vit":
        sizes = {} if train_limit is None else {"n_train": min(800, train_limit), "n_val": min(200, train_limit)}
        return vit_bench(task_names, sizes)
    sizes = {} if train_limit is None else {"train": min(1000, train_limit), "val": min(200, train_limit)}
    return roberta_bench(task_names, sizes)


# --------------------------------------------------------------------------- one run
def data_order(n: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """The examples of every step: shuffled epochs drawn from ``seed``, incomplete batches dropped."""
    per_epoch = n // batch_size
    if per_epoch < 1:
        raise ValueError(f"batch_size={batch_size} is larger than the {n} training examples; lower it")
    gen = torch.Generator().manual_seed(seed)
    batches: list[torch.Tensor] = []
    while len(batches) < steps:
        batches += list(torch.randperm(n, generator=gen)[: per_epoch * batch_size].split(batch_size))
    return batches[:steps]


def fit(model: nn.Module, task, examples: tuple, *, steps: int, batch_size: int, lr: float, warmup_steps: int,
        weight_decay: float, seed: int, run_dir: Optional[Path] = None, plot: bool = True,
        callbacks: Sequence = ()) -> list[float]:
    """Train what requires grad for ``steps`` steps in the one training loop (:func:`adapterlab.train.train`)
    on the batches of :func:`data_order`; returns the loss of every step.

    AdamW (weight decay on matrices only) with linear warm-up and a cosine decay, gradients clipped
    to norm 1. A model with gates and a ``run_dir`` records them there (gates.jsonl, and gates.png
    if ``plot``); ``callbacks`` are the loop's (e.g. :class:`adapterlab.worlds.tinyworld.FirstLosses`)."""
    order = data_order(len(examples[0]), batch_size, steps, seed)
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, weight_decay=weight_decay,
                         clip=1.0, seed=seed, checkpoint=False, log_every=1, progress=False)
    recorder = [GateRecorder(run_dir, every=max(1, steps // 40), plot=plot)] if run_dir and gated_layers(model) else []
    metrics = train(model, examples[0], config, callbacks=[*recorder, *callbacks],
                    batch_fn=lambda step: tuple(t[order[step]] for t in examples), loss_fn=task.loss)
    model.eval()
    return [loss for _, loss in metrics["loss_history"]]


@dataclass(frozen=True)
class RunSpec:
    """One training run of a study."""

    phase: str  # "search" (train -> val) or "final" (train + val -> test)
    task: str
    method: str
    lr: float
    seed: int

    @property
    def key(self) -> tuple:
        return (self.phase, self.task, self.method, self.lr, self.seed)

    @property
    def folder(self) -> str:
        return f"{self.phase}-{self.task}-{self.method}-lr{self.lr:g}-s{self.seed}"


def run_one(bench: Bench, config: "StudyConfig", spec: RunSpec, out: Optional[Path] = None) -> dict:
    """Train one method on one task with one seed and learning rate; return the run's record."""
    t0 = time.perf_counter()
    task = bench.tasks[spec.task]
    model = bench.set_head(copy.deepcopy(bench.base), task.n_out, spec.seed)
    prepare(model, spec.method, prompt_len=config.adapter.prompt_len, layers=config.adapter.layers, seed=spec.seed)
    final = spec.phase == "final"
    t = config.train
    losses = fit(model, task, training_examples(task, final), steps=t.steps, batch_size=t.batch_size,
                 lr=spec.lr, warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, seed=spec.seed,
                 run_dir=None if out is None else out / "runs" / spec.folder, plot=config.run_plots)
    scores = task.score(model, "test" if final else "val")
    return {**asdict(spec), "settings": config.run_settings(), "scores": scores,
            "trainable_params": count_trainable(model), "total_params": sum(p.numel() for p in model.parameters()),
            "first_loss": losses[0], "final_loss": sum(losses[-10:]) / len(losses[-10:]),
            "losses": [round(x, 5) for x in losses], "seconds": round(time.perf_counter() - t0, 1)}


# --------------------------------------------------------------------------- the study
def study_train(steps: int = 200, batch_size: int = 32, warmup_steps: int = 20) -> TrainConfig:
    """Every run's budget (its learning rate and seed are the run's): AdamW, weight decay 0.02."""
    return TrainConfig(steps=steps, batch_size=batch_size, warmup_steps=warmup_steps, weight_decay=0.02,
                       checkpoint=False, progress=False)


@dataclass
class StudyConfig:
    """One study of a family.

    methods / tasks: None = all of the family's. seeds: final runs per method and task.
    train: every run's budget (steps, batch_size, warmup_steps, weight_decay; the learning rate is
    the search's or ``lrs``'). adapter: K prompts (prompt_len) in the top L layers (layers) for
    zero_init and ungated (K for input_prompts too).
    lrs: {method: rate} to skip the search (the demos), else ``lr_grids`` are searched on
    ``search_tasks`` (None: every task) with seed 0. train_limit: keep only the first N train (and
    val) examples of each task. run_plots: draw gates.png in every gated run's folder.
    """

    family: str = "vit"
    methods: Optional[tuple[str, ...]] = None
    tasks: Optional[tuple[str, ...]] = None
    seeds: int = 3
    train: TrainConfig = field(default_factory=study_train)
    adapter: AdapterConfig = field(default_factory=lambda: AdapterConfig(prompt_len=10, layers=4))
    lrs: Optional[dict] = None
    lr_grids: dict = field(default_factory=lambda: dict(LR_GRIDS))
    search_tasks: Optional[tuple[str, ...]] = None
    train_limit: Optional[int] = None
    run_plots: bool = False

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}; got {self.family!r}")
        self.methods = tuple(method_name(m) for m in self.methods or METHODS[self.family])
        wrong = [m for m in self.methods if m not in METHODS[self.family]]
        if wrong or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods for {self.family} must be distinct names from {METHODS[self.family]}; "
                             f"got {list(self.methods)}")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"seeds must be a whole number >= 1; got {self.seeds!r}")
        if not isinstance(self.train, TrainConfig) or self.train.steps is None:
            raise ValueError(f"train must be a TrainConfig with steps set; got {self.train!r}")
        if not isinstance(self.adapter, AdapterConfig):
            raise ValueError(f"adapter must be an AdapterConfig; got {self.adapter!r}")
        warmup = self.train.warmup_steps
        if not isinstance(warmup, int) or not 0 <= warmup <= self.train.steps:
            raise ValueError(f"warmup_steps must be between 0 and steps={self.train.steps}; got {warmup!r}")
        if self.lrs is not None:
            lrs = {method_name(m): lr for m, lr in self.lrs.items()}
            missing = [m for m in self.methods if m not in lrs]
            if missing:
                raise ValueError(f"lrs has no learning rate for {missing}; give one per method or None to search")
            self.lrs = {m: float(lrs[m]) for m in self.methods}
        known = task_names(self.family)
        for name in ("tasks", "search_tasks"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(value)
                wrong = [t for t in value if t not in known]
                if not value or wrong or len(set(value)) != len(value):
                    raise ValueError(f"{name} for {self.family} must be distinct names from {known}; got {list(value)}")
                setattr(self, name, value)
        if self.tasks and self.search_tasks and not set(self.search_tasks) <= set(self.tasks):
            raise ValueError(f"search_tasks {list(self.search_tasks)} must be among tasks {list(self.tasks)}")
        grids = {method_name(m): g for m, g in self.lr_grids.items()}
        self.lr_grids = {m: tuple(float(x) for x in grids[m]) for m in self.methods}

    def run_settings(self) -> dict:
        """What every run shares, as runs.jsonl records it (not which methods, tasks or seeds run,
        nor how learning rates are chosen)."""
        t, a = self.train, self.adapter
        return {"family": self.family, "steps": t.steps, "batch_size": t.batch_size, "warmup_steps": t.warmup_steps,
                "weight_decay": t.weight_decay, "prompt_len": a.prompt_len, "layers": a.layers,
                "train_limit": self.train_limit}

    def settings(self) -> dict:
        """The whole study, flat (results.json's "settings")."""
        return {**self.run_settings(), "methods": list(self.methods), "tasks": self.tasks, "seeds": self.seeds,
                "lrs": self.lrs, "lr_grids": self.lr_grids, "search_tasks": self.search_tasks,
                "run_plots": self.run_plots}


def task_names(family: str) -> tuple[str, ...]:
    """The tasks of a family: the VTAB-style tasks (ViT) or the two SQuAD-style sets (RoBERTa)."""
    if family == "vit":
        from ..worlds.vtab import TASKS

        return tuple(TASKS)
    return tuple(QA_TASKS)


def search_plan(config: StudyConfig, task_names: Sequence[str]) -> list[RunSpec]:
    if config.lrs is not None:
        return []
    return [RunSpec("search", t, m, lr, 0) for m in config.methods for lr in config.lr_grids[m]
            for t in (config.search_tasks or task_names)]


def choose_lrs(runs: list[dict], config: StudyConfig) -> dict:
    """Per method, the rate of its grid with the best mean search score (the fixed ``lrs`` if given)."""
    if config.lrs is not None:
        return dict(config.lrs)
    chosen = {}
    for m in config.methods:
        means = search_table(runs, config)[m]
        chosen[m] = float(max(means, key=lambda lr: means[lr]))
    return chosen


def search_table(runs: list[dict], config: StudyConfig) -> dict:
    """{method: {lr: mean search score over the search tasks}}."""
    table: dict = {}
    for m in config.methods:
        for lr in config.lr_grids[m]:
            rows = [r for r in runs if r["phase"] == "search" and r["method"] == m and r["lr"] == lr]
            if rows:
                table.setdefault(m, {})[lr] = sum(selection_score(config.family, r["scores"]) for r in rows) / len(rows)
    return table


def run_study(out_dir: str | os.PathLike, config: StudyConfig, bench: Optional[Bench] = None, progress: bool = True,
              command: Optional[str] = None, threads: Optional[int] = None) -> dict:
    """Run every run of the study not yet in ``out_dir/runs.jsonl``, then write metrics.json,
    results.json, table.png and gates.png; return the results. Safe to kill and rerun.

    threads: CPU threads for torch (None: $ADAPTERLAB_THREADS, default 1; 0: leave torch's setting).
    Raises ValueError if ``out_dir`` holds runs made with other settings.
    """
    out = harness.study_folder(out_dir)
    runs_path = out / RUNS_NAME
    runs = read_runs(runs_path)
    harness.check_settings(runs, config.run_settings(), runs_path)
    with cpu_threads(default_threads() if threads is None else threads):
        bench = bench or make_bench(config.family, config.tasks, config.train_limit)
        task_names = list(config.tasks or bench.tasks)
        done = {tuple(r[k] for k in ("phase", "task", "method", "lr", "seed")) for r in runs}
        search = search_plan(config, task_names)
        n_final = len(config.methods) * len(task_names) * config.seeds
        todo_search = [s for s in search if s.key not in done]
        bar = harness.study_bar(len(search) + n_final, len(search) - len(todo_search), f"{config.family} study",
                                progress)
        label = lambda s: f"{s.phase} {s.task} {s.method} lr={s.lr:g} seed {s.seed}"  # noqa: E731
        harness.run_missing(todo_search, lambda s: run_one(bench, config, s, out), runs, runs_path, bar, label)
        lrs = choose_lrs(runs, config)
        final = [RunSpec("final", t, m, lrs[m], s) for s in range(config.seeds) for m in config.methods
                 for t in task_names]
        todo_final = [s for s in final if s.key not in done]
        if bar is not None:
            bar.update(len(final) - len(todo_final))
        harness.run_missing(todo_final, lambda s: run_one(bench, config, s, out), runs, runs_path, bar, label)
        if bar is not None:
            bar.close()
    final_keys = {s.key for s in final}
    finals = [r for r in runs if tuple(r[k] for k in ("phase", "task", "method", "lr", "seed")) in final_keys]
    groups = {name: bench.tasks[name].group for name in task_names}
    methods = summarize(finals, config, groups)
    results = {"family": config.family, "base": bench.base_name, "methods": methods, "chosen_lr": lrs, "lr_search": search_table(runs, config),
               "settings": {**config.settings(), "tasks": task_names}, "task_groups": groups,
               "command": command or f"adapterlab.studies.families.run_study(config={config!r})",
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": harness.machine(default_threads() if threads is None else threads),
               "run_seconds": round(sum(r["seconds"] for r in runs), 1)}
    atomic_write_text(out / METRICS_NAME, json.dumps({"methods": methods}, indent=2) + "\n")
    atomic_write_text(out / RESULTS_NAME, json.dumps(results, indent=2) + "\n")
    plot_table(results, out / TABLE_NAME)
    gate_run = first_gate_run(out, finals)
    if gate_run is not None:
        save_plot(gate_run, out / GATES_PLOT)
    return results


def first_gate_run(out: Path, finals: list[dict]) -> Optional[Path]:
    """The gates.jsonl of the first zero-init final run (seed 0 of the first task), if recorded."""
    for r in finals:
        if r["method"] == "zero_init":
            path = out / "runs" / RunSpec(r["phase"], r["task"], r["method"], r["lr"], r["seed"]).folder / "gates.jsonl"
            if path.is_file():
                return path
    return None


# --------------------------------------------------------------------------- summary
def per_seed_scores(rows: list[dict], family: str, groups: dict) -> dict:
    """One method's final runs -> {seed: {score name: value}}: per-task scores, then the VTAB groups
    (mean over the group's tasks) and their average (ViT), or EM / F1 per SQuAD version (RoBERTa)."""
    by_seed: dict = {}
    for r in rows:
        by_seed.setdefault(r["seed"], {})[r["task"]] = r["scores"]
    table = {}
    for seed, tasks in sorted(by_seed.items()):
        if family == "vit":
            row = {f"task:{t}": s["accuracy"] for t, s in tasks.items()}
            present = [g for g in GROUPS if any(groups[t] == g for t in tasks)]
            for g in present:
                row[g] = sum(s["accuracy"] for t, s in tasks.items() if groups[t] == g) / sum(
                    groups[t] == g for t in tasks)
            row["average"] = sum(row[g] for g in present) / len(present)
        else:
            row = {}
            for t, s in tasks.items():
                row[f"{t}_em"], row[f"{t}_f1"] = s["em"], s["f1"]
        table[seed] = row
    return table


def summarize(finals: list[dict], config: StudyConfig, groups: dict) -> dict:
    """The table of metrics.json: per method, trainable parameters and every score's mean, with
    its std over seeds beside it (``natural`` and ``natural_std`` ...), per-task numbers in ``tasks``."""
    methods = {}
    for m in config.methods:
        rows = [r for r in finals if r["method"] == m]
        if not rows:
            continue
        seeds = per_seed_scores(rows, config.family, groups)
        names = list(next(iter(seeds.values())))
        entry: dict = {"trainable_params": round(sum(r["trainable_params"] for r in rows) / len(rows)),
                       "trainable_fraction": sum(r["trainable_params"] / r["total_params"] for r in rows) / len(rows),
                       "lr": rows[0]["lr"], "seeds": len(seeds)}
        tasks: dict = {}
        for name in names:
            s = harness.stats([row[name] for row in seeds.values() if name in row])
            mean, std = s["mean"], s["std"]
            if name.startswith("task:"):
                tasks[name[5:]] = {"mean": mean, "std": std}
            else:
                entry[name], entry[f"{name}_std"] = mean, std
        if tasks:
            entry["tasks"] = tasks
        methods[m] = entry
    return methods


def score_columns(family: str, methods: dict) -> list[str]:
    """The table's score columns, in the paper's order."""
    if family == "vit":
        return [g for g in (*GROUPS, "average") if any(g in row for row in methods.values())]
    return [c for c in ("squad1_em", "squad1_f1", "squad2_em", "squad2_f1") if any(c in r for r in methods.values())]


def mean_pm_std(row: dict, column: str, pm: str = "±") -> str:
    """``row[column]`` and its std over seeds, in percent: "71.3 ± 1.2"."""
    return harness.mean_pm_std(row[column], row[column + "_std"], 1, pm, scale=100)


def format_table(family: str, methods: dict) -> str:
    """The study as text: trainable parameters and mean +- std over seeds per method (in percent)."""
    methods = harness.upgrade_keys(methods)
    cols = score_columns(family, methods)
    rows = [[LABELS[m], f"{row['trainable_params']:,d}", *(mean_pm_std(row, c, "+-") for c in cols)]
            for m, row in methods.items()]
    return harness.format_table(["method", "trainable", *cols], rows, [42, 10] + [15] * len(cols))


def read_results(folder: str | os.PathLike) -> dict:
    """A study's results.json, with today's method names (the committed studies say "ungated_prompts")."""
    results = json.loads((Path(folder) / RESULTS_NAME).read_text())
    for key in ("methods", "chosen_lr", "lr_search"):
        results[key] = harness.upgrade_keys(results[key])
    for key in ("lrs", "lr_grids"):
        if results["settings"].get(key):
            results["settings"][key] = harness.upgrade_keys(results["settings"][key])
    if results["settings"].get("methods"):
        results["settings"]["methods"] = [method_name(m) for m in results["settings"]["methods"]]
    return results


def plot_table(results: dict, path: Optional[str | os.PathLike] = None):
    """The table as a picture: one row per method, mean +- std in percent, the best mean of each
    column in bold. Returns the figure (saved to ``path`` when given)."""
    from ..gates import pyplot

    plt = pyplot()
    methods, family = results["methods"], results["family"]
    cols = score_columns(family, methods)
    best = {c: max(row[c] for row in methods.values()) for c in cols}
    cells = [[f"{row['trainable_params']:,} ({100 * row['trainable_fraction']:.2f}%)"]
             + [mean_pm_std(row, c) for c in cols] for row in methods.values()]
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * (len(cols) + 1) + 1.8, 0.5 + 0.36 * (len(methods) + 1)))
    ax.axis("off")
    table = ax.table(cellText=cells, rowLabels=[LABELS[m] for m in methods], colLabels=["trainable"] + cols,
                     loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 1.3)
    for i, row in enumerate(methods.values(), start=1):
        for j, c in enumerate(cols, start=1):
            if row[c] == best[c]:
                table[i, j].get_text().set_fontweight("bold")
    seeds = max(row["seeds"] for row in methods.values())
    what = "accuracy (%)" if family == "vit" else "EM / F1 (%)"
    fig.suptitle(f"{family}: {what}, mean ± std over {seeds} seed(s)", fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
    return fig


# --------------------------------------------------------------------------- defaults
# The committed studies (docs/results/families/<family>/results.json): the budget of every run and
# the task the learning-rate search runs on (every task of the family is studied). Sized so that a
# family's study takes about an hour on one thread of a 2-core machine.
STUDY = {
    "vit": dict(train=study_train(steps=200, batch_size=32, warmup_steps=20), search_tasks=("digits",)),
    "roberta": dict(train=study_train(steps=400, batch_size=32, warmup_steps=40), search_tasks=("squad1",)),
}
BUDGET = ("steps", "batch_size", "warmup_steps", "weight_decay")  # study_config's keywords that go into train


def study_config(family: str, **changes) -> StudyConfig:
    """The study of ``family`` with :data:`STUDY`'s settings; ``changes`` set to None keep the default
    (steps, batch_size, warmup_steps and weight_decay change its TrainConfig; fewer steps shorten the warm-up)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}; got {family!r}")
    changes = {k: v for k, v in changes.items() if v is not None}
    budget = {k: changes.pop(k) for k in BUDGET if k in changes}
    settings = {**STUDY[family], **changes}
    if changes.get("tasks") and not changes.get("search_tasks"):  # search among the chosen tasks
        kept = [t for t in settings.get("search_tasks") or () if t in changes["tasks"]]
        settings["search_tasks"] = tuple(kept) or tuple(changes["tasks"][:1])
    if "steps" in budget:
        warmup = budget.get("warmup_steps", settings["train"].warmup_steps)
        budget["warmup_steps"] = min(warmup, max(0, budget["steps"] // 10))
    settings["train"] = replace(settings["train"], **budget)
    return StudyConfig(family=family, **settings)


# --------------------------------------------------------------------------- demos
# The demos: every method once (seed 0), at the rates the study's search chose (DEFAULT_LR), with a
# gate plot per gated run. A smaller budget than the study, to finish in about 3 minutes on 2 cores:
# the ViT on one task per VTAB group and half the study's steps, the text encoder on both SQuAD
# versions with a quarter of its steps. So the demo's numbers are lower than the study's.
DEMO = {
    "vit": dict(train=study_train(steps=100, batch_size=32, warmup_steps=10), tasks=("digits", "noisy_shapes", "count"),
                seeds=1, run_plots=True),
    "roberta": dict(train=study_train(steps=100, batch_size=32, warmup_steps=10), seeds=1, run_plots=True),
}


def demo_config(family: str, **changes) -> StudyConfig:
    """The demo's study: :data:`DEMO` for the family, the rates of :data:`DEFAULT_LR`, ``changes`` applied."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}; got {family!r}")
    demo = {**DEMO[family], "train": replace(DEMO[family]["train"])}  # a copy: the table stays as it is
    return replace(StudyConfig(family=family, lrs=DEFAULT_LR[family], **demo), **changes)


def run_demo(out_dir: str | os.PathLike, family: str, progress: bool = True, verbose: bool = True,
             bench: Optional[Bench] = None, threads: Optional[int] = None, **changes) -> dict:
    """``adapterlab demo --vit`` / ``--roberta``: every method once on the demo's tasks; prints the
    table; writes metrics.json, results.json, table.png and gates.png into ``out_dir``.
    threads: as :func:`run_study`."""
    config = demo_config(family, **changes)
    results = run_study(out_dir, config, bench=bench, progress=progress, threads=threads,
                        command=f"adapterlab demo --{family} --out {out_dir}")
    if verbose:
        print(format_table(family, results["methods"]))
        study = study_config(family)
        print(f"One seed at {config.train.steps} steps per run: a short budget, where the slower methods have not learned yet. "
              f"The committed study ({study.seeds} seeds, {study.train.steps} steps, every task) is in "
              f"docs/results/families/{family}/ and notebook 11.")
    return results


__all__ = ["FAMILIES", "METHODS", "LABELS", "LR_GRIDS", "DEFAULT_LR", "prepare", "ImageTask", "QATask", "Bench",
           "vit_bench", "roberta_bench", "make_bench", "data_order", "fit", "RunSpec", "run_one", "StudyConfig",
           "run_study", "read_runs", "read_results", "choose_lrs", "search_table", "summarize", "format_table",
           "plot_table", "STUDY", "study_config", "DEMO", "demo_config", "run_demo"]
