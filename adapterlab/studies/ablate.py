"""The zero-init ablation, measured: zero-init gates vs random-init gates vs ungated prompts, over seeds.

Layer: recipes (above tinyworld and train, below cli). ``adapterlab ablate`` calls :func:`run_ablation`.

Three variants of the same adapter (K prompts in the top L layers of the tiny-world base):

    zero    AdapterConfig(init="zero")    the method: gates start at 0, the base is untouched at step 0
    random  AdapterConfig(init="random")  the paper's ablation: the same gates, started at random
    none    AdapterConfig(gate="none")    no gate: the prompts join the tokens' softmax (prefix tuning)

Each run: a fresh copy of the cached tiny-world base, one variant, one seed (the seed draws the
prompts and the random gates, and orders the data), the same data and budget. A run records

    losses            the training loss of every step (Fig. 5)
    eval_history      held-out accuracy and loss every eval_every steps and at the end (Table 5)
    knowledge_before  what the base knows, measured with the adapter attached, before training:
    knowledge_after     the loss on its pretraining text and the accuracy of completing every
                        person's facts in the pretraining phrasing ("Mara lives in" -> Oslo)
    gate_log          how much the prompts take part: mean |gate| and the prompts' share of the
                        attention (gated: |g|/(1+|g|); ungated: the softmax mass on the prompts)

``DIR/runs.jsonl`` gets one line per finished run (the file is rewritten atomically, so a run
killed midway leaves no line and is redone on the next call; finished runs are skipped).
``DIR/summary.json`` holds mean, std and a 95% interval over seeds per variant, and
``DIR/ablation.png`` the four plots.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..adapter import AdapterConfig, adapted_layers, add_adapter
from ..data import collate, instruction_dataset, text_windows
from ..io.files import atomic_write_text, cpu_threads, default_threads
from ..losses import loss_sum
from ..train import TrainConfig, train

VARIANTS = {
    "zero": dict(init="zero"),  # the paper: gates start at 0
    "random": dict(init="random"),  # the paper's ablation: gates start at N(0, 1) draws
    "none": dict(gate="none"),  # no gate: prompts and tokens in one softmax
}
LABELS = {"zero": "zero-init gates", "random": "random-init gates", "none": "ungated (one softmax)"}
COLORS = {"zero": "tab:blue", "random": "tab:red", "none": "tab:green"}
RUNS_NAME, SUMMARY_NAME, PLOT_NAME = "runs.jsonl", "summary.json", "ablation.png"
METRICS = ("heldout_accuracy", "early_loss", "knowledge_kept", "facts_kept", "first_loss", "final_loss",
           "heldout_loss", "knowledge_at_init", "prompt_share")


# --------------------------------------------------------------------------- config
@dataclass
class AblationConfig:
    """One study: which variants, how many seeds, and the budget every run gets.

    lr, steps, batch_size, warmup_steps: the training budget (same for every run).
    prompt_len, layers: K prompts in the top L layers.
    gate_scale: multiplies the random gates' N(0, 1) draws (variant "random" only).
    prompt_scale: multiplies the prompts' N(0, 1) draws (every variant).
    train_records: use only the first N instruction records (None: all) - the small-data regime.
    eval_every: held-out evaluation every N steps (None: at step 0 and at the end only).
    early_steps: "early loss" is the mean training loss of the first early_steps steps.
    probe_docs: pretraining documents in the knowledge probe's loss (its fact probe asks every person).
    """

    variants: tuple[str, ...] = ("zero", "random", "none")
    seeds: int = 5
    steps: int = 40
    lr: float = 5e-2
    batch_size: int = 16
    warmup_steps: int = 5
    prompt_len: int = 10
    layers: int = 4
    gate_scale: float = 1.0
    prompt_scale: float = 1.0
    train_records: Optional[int] = None
    eval_every: Optional[int] = None
    early_steps: int = 10
    probe_docs: int = 48

    def __post_init__(self) -> None:
        self.variants = tuple(self.variants)
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ValueError(f"variants must be a non-empty subset of {tuple(VARIANTS)}; got {list(self.variants)}")
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants are listed twice: {list(self.variants)}")
        for name in ("seeds", "steps", "batch_size", "prompt_len", "layers", "early_steps", "probe_docs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
        for name in ("lr", "gate_scale", "prompt_scale"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a number > 0; got {value!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0; got {self.warmup_steps!r}")
        if self.early_steps > self.steps:
            raise ValueError(f"early_steps={self.early_steps} is more than steps={self.steps}; lower it")
        if self.eval_every is not None and (not isinstance(self.eval_every, int) or self.eval_every < 1):
            raise ValueError(f"eval_every must be an integer >= 1 or None; got {self.eval_every!r}")
        if self.train_records is not None and (not isinstance(self.train_records, int)
                                               or self.train_records < self.batch_size):
            raise ValueError(f"train_records must be at least one batch (batch_size={self.batch_size}); "
                             f"got {self.train_records!r}")

    def run_settings(self) -> dict:
        """What every run of the study shares (all fields but which variants and how many seeds)."""
        return {k: v for k, v in asdict(self).items() if k not in ("variants", "seeds")}

    def adapter_config(self, variant: str) -> AdapterConfig:
        return AdapterConfig(prompt_len=self.prompt_len, layers=self.layers, **VARIANTS[variant])


# --------------------------------------------------------------------------- the bench
@dataclass
class Bench:
    """Everything the runs share: the world, the data and a way to get a fresh base."""

    world: object
    tokenizer: object
    train_data: object
    heldout_records: list
    heldout_data: object
    corpus_data: object
    probe_tokens: torch.Tensor  # a fixed batch of held-out prompts, for the prompts' attention share
    load_base: Callable[[], torch.nn.Module]


def tiny_world_bench(config: AblationConfig, load_base: Optional[Callable] = None) -> Bench:
    """The tiny world's instruction set, held-out questions and pretraining text; ``load_base()``
    returns a fresh copy of the cached base every call (default: :func:`adapterlab.worlds.tinyworld.load_base`)."""
    from ..worlds import tinyworld

    load_base = load_base or (lambda: tinyworld.load_base(progress=False))
    base = load_base()
    world, train_records, heldout_records = tinyworld.load_world()
    _, corpus, _, _ = tinyworld.build_world(tinyworld.Recipe())
    return make_bench(world, base.tokenizer, train_records, heldout_records, corpus, config, load_base)


def make_bench(world, tokenizer, train_records: Sequence[dict], heldout_records: Sequence[dict],
               corpus: Sequence[str], config: AblationConfig, load_base: Callable) -> Bench:
    """A bench from any world (tests use a small one)."""
    from ..worlds.tinyworld import corpus_tokens

    records = list(train_records)[: config.train_records]
    train_data = instruction_dataset(records, tokenizer, max_seq_len=256, source="instruction set")
    if len(train_data) < config.batch_size:
        raise ValueError(f"the instruction set has {len(train_data)} records, fewer than batch_size={config.batch_size}")
    heldout_data = instruction_dataset(heldout_records, tokenizer, max_seq_len=256, source="held-out set")
    corpus_data = text_windows(corpus_tokens(tokenizer, list(corpus)[: config.probe_docs]), 64,
                               source="pretraining text")
    probe_tokens, _ = collate([heldout_data[i] for i in range(min(8, len(heldout_data)))])
    return Bench(world, tokenizer, train_data, list(heldout_records), heldout_data, corpus_data, probe_tokens,
                 load_base)


# --------------------------------------------------------------------------- measurements
@torch.no_grad()
def mean_loss(model, dataset, batch: int = 32) -> float:
    """Average next-token loss over the dataset's targets (response tokens; every token for text)."""
    total, n = 0.0, 0
    for s in range(0, len(dataset), batch):
        idx = range(s, min(s + batch, len(dataset)))
        tokens, labels = collate([dataset[i] for i in idx])
        total += loss_sum(model, tokens.to(model.device), labels.to(model.device)).item()
        n += dataset.n_targets(idx)
    return total / max(n, 1)


# How the pretraining text starts a fact; the model's greedy continuation must name the value.
FACT_PROMPTS = {"city": "{n} lives in", "pet": "The pet of {n} is", "job": "The job of {n} is",
                "color": "The favourite colour of {n} is", "instrument": "The instrument of {n} is"}


@torch.no_grad()
def fact_completion_accuracy(model, tokenizer, world, max_new_tokens: int = 4) -> float:
    """Fraction of every person's facts the model completes in the pretraining's own words, no
    template ("Mara lives in" -> " Oslo."): right value named, no other value of that attribute."""
    from ..generate import generate
    from ..worlds.tinyworld import ATTRIBUTES, answer_is_correct

    prompts, truths = [], []
    for p in world.people:
        for attribute, values in ATTRIBUTES.items():
            prompts.append(FACT_PROMPTS[attribute].format(n=p.name))
            truths.append((p.get(attribute), [v for v in values if v != p.get(attribute)]))
    outs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, greedy=True)
    return sum(answer_is_correct(out, v, others) for out, (v, others) in zip(outs, truths)) / len(prompts)


@torch.no_grad()
def knowledge(model, bench: Bench) -> dict:
    """What the model knows of its pretraining, asked in the pretraining's own words (no template):
    ``corpus_loss`` on pretraining text and ``fact_accuracy`` completing every person's facts."""
    was_training = model.training
    model.eval()
    result = {"corpus_loss": mean_loss(model, bench.corpus_data),
              "fact_accuracy": fact_completion_accuracy(model, bench.tokenizer, bench.world)}
    model.train(was_training)
    return result


@torch.no_grad()
def evaluate(model, bench: Bench) -> dict:
    from ..worlds.tinyworld import heldout_accuracy

    return {"heldout_accuracy": heldout_accuracy(model, bench.tokenizer, bench.heldout_records),
            "heldout_loss": mean_loss(model, bench.heldout_data)}


@torch.no_grad()
def prompt_share(model, tokens: torch.Tensor) -> float:
    """The prompts' share of the attention, averaged over adapted layers, heads and positions.

    Gated layers: out = attention over tokens + g * attention over prompts, so the prompts' weight
    is |g| against the tokens' 1: share |g| / (1 + |g|). Ungated layers: the softmax mass on the
    prompts, w = sigmoid(lse(S^K) - lse(S^{M+1})) of :func:`adapterlab.adapter.joint_prompt_attention`.
    """
    shares, hooks = [], []

    def capture(module, args, kwargs, output):
        q, attn = args[0], args[1]
        if module.gate is not None:
            g = module.gate_value().abs().float()
            shares.append((g / (1 + g)).mean().item())
            return
        keys = kwargs["keys"]
        pk, _ = module.prompt_kv(attn)
        rep = q.shape[1] // keys.shape[1]
        keys, pk = keys.repeat_interleave(rep, 1), pk.to(q.dtype).repeat_interleave(rep, 1)
        d, T = q.shape[-1], q.shape[2]
        s_p = (q @ pk.transpose(-2, -1)).float() / math.sqrt(d)
        s_t = (q @ keys.transpose(-2, -1)).float() / math.sqrt(d)
        s_t = s_t.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))
        shares.append(torch.sigmoid(s_p.logsumexp(-1) - s_t.logsumexp(-1)).mean().item())

    for i in adapted_layers(model):
        hooks.append(model.layers[i].attention.adapter.register_forward_hook(capture, with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        model(tokens.to(model.device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return sum(shares) / len(shares)


def gate_record(model, step: int, bench: Bench) -> dict:
    """Gate and prompt sizes at one step (means over the adapted layers)."""
    gates, norms = [], []
    for i in adapted_layers(model):
        ap = model.layers[i].attention.adapter
        norms.append(ap.prompt.detach().float().pow(2).mean().sqrt().item())  # RMS of the prompt values
        if ap.gate is not None:
            gates.append(ap.gate_value().detach().abs().float().mean().item())
    return {"step": step, "gate_abs": sum(gates) / len(gates) if gates else None,
            "prompt_rms": sum(norms) / len(norms), "prompt_share": prompt_share(model, bench.probe_tokens)}


# --------------------------------------------------------------------------- one run
def attach(model, config: AblationConfig, variant: str, seed: int):
    """Attach the variant's adapter (prompts and random gates drawn from ``seed``), scaled as configured."""
    add_adapter(model, config.adapter_config(variant), seed=seed)
    with torch.no_grad():
        for i in adapted_layers(model):
            ap = model.layers[i].attention.adapter
            ap.prompt.mul_(config.prompt_scale)
            if ap.gate is not None:
                ap.gate.mul_(config.gate_scale)  # zero gates stay zero
    return model


def run_one(bench: Bench, config: AblationConfig, variant: str, seed: int) -> dict:
    """Train one variant with one seed on a fresh base; return the run's record (JSON-ready)."""
    t0 = time.perf_counter()
    model = attach(bench.load_base(), config, variant, seed)
    before = knowledge(model, bench)
    gate_log = [gate_record(model, 0, bench)]
    losses: list[float] = []

    def on_step(step: int, info: dict) -> None:
        losses.append(info["loss"])
        if step in (1, 2, 3, 5) or step % 10 == 0 or step == info["total_steps"]:
            gate_log.append(gate_record(model, step, bench))

    tc = TrainConfig(steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                     warmup_steps=config.warmup_steps, eval_every=config.eval_every, checkpoint=False,
                     record_gates=False, progress=False, seed=seed, desc=f"{variant} seed {seed}")
    metrics = train(model, bench.train_data, tc, eval_fn=lambda m: evaluate(m, bench), callbacks=[on_step])
    evals = metrics["eval_history"]
    after = knowledge(model, bench)
    final = evals[-1]
    return {
        "variant": variant, "seed": seed, "settings": config.run_settings(),
        "heldout_accuracy": final["heldout_accuracy"], "heldout_loss": final["heldout_loss"],
        "early_loss": sum(losses[: config.early_steps]) / config.early_steps,
        "first_loss": losses[0], "final_loss": sum(losses[-10:]) / len(losses[-10:]),
        "knowledge_kept": after["corpus_loss"], "facts_kept": after["fact_accuracy"],
        "knowledge_at_init": before["corpus_loss"], "prompt_share": gate_log[-1]["prompt_share"],
        "knowledge_before": before, "knowledge_after": after,
        "losses": losses, "eval_history": evals, "gate_log": gate_log,
        "steps_per_epoch": metrics["steps_per_epoch"], "trainable_params": metrics["trainable_params"],
        "seconds": round(time.perf_counter() - t0, 1),
    }


# --------------------------------------------------------------------------- the study
def read_runs(path: str | os.PathLike) -> list[dict]:
    """The finished runs in a runs.jsonl (a line that does not parse is reported, not skipped silently)."""
    path = Path(path)
    if not path.is_file():
        return []
    runs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            runs.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {n}: not JSON ({e}); delete that line to redo the run") from None
    return runs


def run_ablation(out_dir: str | os.PathLike, config: Optional[AblationConfig] = None, progress: bool = True,
                 command: Optional[str] = None, bench: Optional[Bench] = None, plot: bool = True,
                 threads: Optional[int] = None) -> dict:
    """Run every (variant, seed) of the study not yet in ``out_dir/runs.jsonl``; write the summary
    and the plots; return the summary. Safe to interrupt: the next call redoes only what is missing.

    Raises ValueError if ``out_dir`` holds runs made with other settings (use a new folder).
    threads: CPU threads for torch (None: $ADAPTERLAB_THREADS, default 1; 0: leave torch's setting).
    """
    config = config or AblationConfig()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the study's results")
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / RUNS_NAME
    runs = read_runs(runs_path)
    settings = config.run_settings()
    for r in runs:
        if r.get("settings") != settings:
            changed = sorted(k for k in settings if (r.get("settings") or {}).get(k) != settings[k])
            raise ValueError(
                f"{runs_path} holds runs made with other settings (differing: {', '.join(changed) or 'all'}); "
                f"use a new --out folder, or the same settings to resume"
            )
    done = {(r["variant"], r["seed"]) for r in runs}
    todo = [(v, s) for s in range(config.seeds) for v in config.variants if (v, s) not in done]
    if todo:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc="ablation runs", unit="run", dynamic_ncols=True)
        with cpu_threads(default_threads() if threads is None else threads):
            bench = bench or tiny_world_bench(config)
            for variant, seed in todo:
                if bar is not None:
                    bar.set_postfix_str(f"{variant}, seed {seed}")
                runs.append(run_one(bench, config, variant, seed))
                atomic_write_text(runs_path, "".join(json.dumps(r) + "\n" for r in runs))
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
    wanted = [r for r in runs if r["variant"] in config.variants and r["seed"] < config.seeds]
    summary = summarize(wanted, config, command=command)
    atomic_write_text(out / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
    if plot:
        plot_study(wanted, out / PLOT_NAME)
    return summary


# --------------------------------------------------------------------------- statistics
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def stats(values: Sequence[float]) -> dict:
    """mean, sample std and a 95% interval for the mean (Student's t) over seeds."""
    xs = [float(x) for x in values]
    n = len(xs)
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    half = (T_975[n - 2] if n - 1 <= len(T_975) else 1.96) * std / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half] if n > 1 else None, "n": n}


def machine() -> str:
    name = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} torch thread(s), {platform.system()}"


def versions() -> dict:
    import importlib.metadata

    import numpy

    return {"adapterlab": importlib.metadata.version("adapterlab"), "torch": torch.__version__, "numpy": numpy.__version__,
            "python": sys.version.split()[0]}


def summarize(runs: Sequence[dict], config: AblationConfig, command: Optional[str] = None) -> dict:
    """The study's summary: per variant, mean/std/95% interval over seeds of every metric."""
    variants = {}
    for v in config.variants:
        rows = [r for r in runs if r["variant"] == v]
        if not rows:
            continue
        variants[v] = {"seeds": len(rows), **{m: stats([r[m] for r in rows]) for m in METRICS}}
    base = next((r["knowledge_before"] for r in runs if r["variant"] == "zero"), None)
    return {"variants": variants, "base_knowledge": base, "settings": config.run_settings(),
            "command": command or f"adapterlab.studies.ablate.run_ablation(config={config!r})",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
            "versions": versions(), "run_seconds": sum(r["seconds"] for r in runs)}


LOWER_IS_BETTER = {"early_loss": True, "first_loss": True, "final_loss": True, "heldout_loss": True,
                   "knowledge_kept": True, "knowledge_at_init": True, "heldout_accuracy": False, "facts_kept": False}
METRIC_NAMES = {"heldout_accuracy": "held-out accuracy", "early_loss": "early training loss",
                "knowledge_kept": "loss on the pretraining text after training", "facts_kept": "facts kept",
                "first_loss": "first-step loss", "final_loss": "final training loss", "heldout_loss": "held-out loss",
                "knowledge_at_init": "loss on the pretraining text at step 0"}


def compare(runs: Sequence[dict], metric: str, a: str = "zero", b: str = "random") -> dict:
    """Variant a against variant b on one metric, paired by seed (same seed: same data order and
    prompt draws). Returns the paired difference's stats and a verdict: "better" or "worse" when its
    95% interval excludes 0, "no clear difference" otherwise."""
    by_seed = {v: {r["seed"]: r[metric] for r in runs if r["variant"] == v} for v in (a, b)}
    seeds = sorted(set(by_seed[a]) & set(by_seed[b]))
    if len(seeds) < 2:
        raise ValueError(f"comparing {a} with {b} needs at least 2 seeds run for both; found {len(seeds)}")
    diff = stats([by_seed[a][s] - by_seed[b][s] for s in seeds])
    lo, hi = diff["ci95"]
    if lo <= 0 <= hi:
        verdict = "no clear difference"
    else:
        a_is_better = diff["mean"] < 0 if LOWER_IS_BETTER[metric] else diff["mean"] > 0
        verdict = "better" if a_is_better else "worse"
    return {"metric": metric, "a": a, "b": b, "a_mean": stats(list(by_seed[a].values()))["mean"],
            "b_mean": stats(list(by_seed[b].values()))["mean"], "difference": diff, "verdict": verdict}


def sentence(c: dict, digits: int = 3) -> str:
    """A comparison from :func:`compare` in words, with its numbers."""
    lo, hi = c["difference"]["ci95"]
    f = f"{{:.{digits}f}}"
    what = {"better": "beats", "worse": "loses to", "no clear difference": "is not clearly different from"}[c["verdict"]]
    return (f"{LABELS[c['a']]} {what} {LABELS[c['b']]} on {METRIC_NAMES[c['metric']]}: "
            f"{f.format(c['a_mean'])} vs {f.format(c['b_mean'])} (paired difference {f.format(c['difference']['mean'])}, "
            f"95% interval [{f.format(lo)}, {f.format(hi)}], {c['difference']['n']} seeds)")


def format_table(summary: dict) -> str:
    """The study as a text table: mean +- std over seeds per variant."""
    cols = [("heldout_accuracy", "held-out acc", 2), ("early_loss", "early loss", 3),
            ("knowledge_kept", "corpus loss after", 3), ("facts_kept", "facts kept", 2),
            ("knowledge_at_init", "corpus loss at init", 3)]
    head = f"{'variant':24s} {'seeds':>5s} " + " ".join(f"{title:>19s}" for _, title, _ in cols)
    lines = [head]
    for v, row in summary["variants"].items():
        cells = " ".join(f"{row[m]['mean']:>11.{p}f} +- {row[m]['std']:<5.{p}f}"[:19].rjust(19) for m, _, p in cols)
        lines.append(f"{LABELS[v]:24s} {row['seeds']:>5d} {cells}")
    base = summary.get("base_knowledge")
    if base:
        lines.append(f"(frozen base: corpus loss {base['corpus_loss']:.3f}, facts {base['fact_accuracy']:.2f})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots
def plot_study(runs: Sequence[dict], path: Optional[str | os.PathLike] = None, title: str = ""):
    """Four panels: loss curves with bands (Fig. 5), held-out accuracy with error bars (Table 5),
    knowledge kept, and the prompts' share of the attention during training. Returns the figure."""
    import matplotlib

    if path is not None and matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    variants = [v for v in VARIANTS if any(r["variant"] == v for r in runs)]
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.6))
    for v in variants:
        rows = [r for r in runs if r["variant"] == v]
        losses = np.array([r["losses"] for r in rows])  # (seeds, steps)
        steps = np.arange(1, losses.shape[1] + 1)
        m, s = losses.mean(0), losses.std(0)
        axes[0].plot(steps, m, color=COLORS[v], label=f"{LABELS[v]} (n={len(rows)})")
        axes[0].fill_between(steps, m - s, m + s, color=COLORS[v], alpha=0.2)
        shares = np.array([[g["prompt_share"] for g in r["gate_log"]] for r in rows])
        gsteps = [g["step"] for g in rows[0]["gate_log"]]
        axes[3].plot(gsteps, shares.mean(0), color=COLORS[v], label=LABELS[v])
        axes[3].fill_between(gsteps, shares.mean(0) - shares.std(0), shares.mean(0) + shares.std(0),
                             color=COLORS[v], alpha=0.2)
    x = np.arange(len(variants))
    for ax, metric, ylabel in ((axes[1], "heldout_accuracy", "held-out accuracy"),
                               (axes[2], "knowledge_kept", "loss on pretraining text")):
        means = [np.mean([r[metric] for r in runs if r["variant"] == v]) for v in variants]
        stds = [np.std([r[metric] for r in runs if r["variant"] == v], ddof=1) if
                sum(r["variant"] == v for r in runs) > 1 else 0 for v in variants]
        ax.bar(x, means, yerr=stds, capsize=4, color=[COLORS[v] for v in variants])
        for v, xi in zip(variants, x):
            ys = [r[metric] for r in runs if r["variant"] == v]
            ax.scatter([xi] * len(ys), ys, color="k", s=10, zorder=3)
        ax.set_xticks(x, [v for v in variants])
        ax.set_ylabel(ylabel)
    base = next((r["knowledge_before"]["corpus_loss"] for r in runs if r["variant"] == "zero"), None)
    if base is not None:
        axes[2].axhline(base, color="k", ls="--", lw=1, label="frozen base")
        axes[2].legend(fontsize=8)
    axes[0].set_yscale("log")
    axes[0].set(xlabel="step", ylabel="training loss (mean +- std)", title="loss curves (Fig. 5)")
    axes[1].set(ylim=(0, 1), title="held-out accuracy (Table 5)")
    axes[2].set(title="knowledge kept (lower: more kept)")
    axes[3].set(xlabel="step", ylabel="prompts' share of attention", title="gate opening")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=90)
        plt.close(fig)
    return fig


def plot_regimes(studies: dict[str, Sequence[dict]], path: Optional[str | os.PathLike] = None,
                 metrics: Sequence[str] = ("early_loss", "heldout_accuracy", "knowledge_kept")):
    """One panel per metric: mean +- std over seeds of every variant, grouped by study (regime).
    studies: {label: runs}. Returns the figure (saved to ``path`` when given)."""
    import matplotlib

    if path is not None and matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.6))
    labels = list(studies)
    width = 0.8 / len(VARIANTS)
    for ax, metric in zip(np.atleast_1d(axes), metrics):
        for j, v in enumerate(VARIANTS):
            xs, means, stds = [], [], []
            for i, label in enumerate(labels):
                ys = [r[metric] for r in studies[label] if r["variant"] == v]
                if ys:
                    xs.append(i + (j - 1) * width)
                    means.append(np.mean(ys))
                    stds.append(np.std(ys, ddof=1) if len(ys) > 1 else 0.0)
                    ax.scatter([xs[-1]] * len(ys), ys, color="k", s=8, zorder=3)
            if xs:
                ax.bar(xs, means, width, yerr=stds, capsize=3, color=COLORS[v], label=LABELS[v])
        ax.set_xticks(range(len(labels)), labels)
        ax.set_title(METRIC_NAMES[metric] + (" (lower: better)" if LOWER_IS_BETTER[metric] else ""), fontsize=10)
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=90)
        plt.close(fig)
    return fig


__all__ = ["AblationConfig", "VARIANTS", "Bench", "tiny_world_bench", "make_bench", "knowledge", "evaluate",
           "prompt_share", "run_one", "run_ablation", "read_runs", "summarize", "stats", "compare", "sentence", "format_table",
           "plot_study", "plot_regimes", "fact_completion_accuracy"]
