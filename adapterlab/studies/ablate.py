"""The zero-init ablation, measured: zero-init gates vs random-init gates vs ungated prompts, over seeds.

``adapterlab ablate`` calls :func:`run_ablation` and prints :func:`report`.

Three variants of the same adapter (K prompts in the top L layers of the base):

    zero_init          AdapterConfig(init="zero")    the method: gates start at 0, the base is untouched at step 0
    random_init        AdapterConfig(init="random")  the paper's ablation: the same gates, started at N(0, 1) draws
                                                     (times gate_scale)
    ungated            no gate: the prompts join the tokens' softmax (prefix tuning)
    random_init_small  random_init at a smaller scale (small_gate_scale, default 0.1): so that "random" is not
                       only the largest disturbance (not one of the three designs; the real-model study runs it)

Two bases (``AblationConfig.base``): the embedded tiny world ("tinyworld", the default) and a real pretrained
LLaMA with a chat tokenizer ("smollm2": SmolLM2-135M-Instruct, 30 layers). On the real model the task is
:mod:`adapterlab.worlds.smollm2`'s (short facts answered in a strict format, scored on held-out facts),
the "pretraining text" is held-out real English (Python's bundled docs) and the "facts" are general
questions the base answers. Each run: a fresh copy of the base, one variant, one seed (the seed draws
the prompts and the random gates, and orders the data), the same data and budget. A run records

    losses, grad_norms  the training loss and gradient norm of every step (Fig. 5); early_loss and
                        early_grad_norm: their means over the first early_steps; loss_spikes: steps whose
                        loss is more than SPIKE times the step before's
    eval_history      held-out accuracy and loss every eval_every steps and at the end (Table 5)
    knowledge_before  what the base knows, measured with the adapter attached, before training:
    knowledge_after     the loss on its pretraining text (pretrain_loss_after: lower = more kept; the real
                        model: the loss on Python's docs, also as text_loss_step0 / text_loss_final) and
                        the accuracy of completing every person's facts in the pretraining phrasing
                        ("Mara lives in" -> Oslo; the real model: the general questions still answered; facts_kept)
    knowledge_log     the same during the run: the text loss at the gate log's steps, the facts too at
                        each evaluation (step 0 and the end: knowledge_before / knowledge_after)
    gate_log          at steps 0, 1, 2, 3, 5, every 10th and the last: the gates per gated layer and
                        head (``layers``, ``gates`` (L, H), as :mod:`adapterlab.gates` records them:
                        ``GateLog.from_records(run["gate_log"])`` reads a gated run's; runs committed
                        before these fields have the means only), their mean |gate| (gate_abs), and the
                        prompts' attention share (attention_share; per adapted layer and head in
                        attention_share_by_head): gated |g|/(1+|g|), ungated the softmax mass on the
                        prompts - a weight in the attention, not adapterlab.gates' ``prompt_share``
                        (a share of the head's output)

The study runs on :mod:`adapterlab.studies.harness`: ``DIR/runs.jsonl`` gets one line per finished
run (a run killed midway is redone on the next call; finished runs are skipped), ``DIR/summary.json``
holds mean, std and a 95% interval over seeds per variant with the paired verdicts
(:func:`comparisons`), and ``DIR/ablation.png`` the four plots; :func:`report` prints it all in words.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..adapter import AdapterConfig, adapted_layers, add_adapter, gate_values
from ..data import collate, instruction_dataset, text_windows
from ..gates import gated_layers
from ..io.files import atomic_write_text, cpu_threads, default_threads
from ..losses import loss_sum
from ..train import TrainConfig, train
from . import harness
from .harness import MIN_SEEDS, VERBS, method_name, read_runs, stats
from .variants import add_ungated_prompts

VARIANTS = {
    "zero_init": dict(init="zero"),  # the paper: gates start at 0
    "random_init": dict(init="random"),  # the paper's ablation: gates start at N(0, 1) draws
    "ungated": dict(init="zero"),  # no gate: prompts and tokens in one softmax (studies.variants)
}
SCALED = {"random_init_small": dict(init="random")}  # random_init's gates times small_gate_scale
ALL_VARIANTS = {**VARIANTS, **SCALED}
LABELS = {"zero_init": "zero-init gates", "random_init": "random-init gates", "ungated": "ungated (one softmax)",
          "random_init_small": "small random gates"}
COLORS = {"zero_init": "tab:blue", "random_init": "tab:red", "ungated": "tab:green", "random_init_small": "tab:orange"}
RUNS_NAME, SUMMARY_NAME, PLOT_NAME = harness.RUNS_NAME, "summary.json", "ablation.png"
METRICS = ("heldout_accuracy", "early_loss", "pretrain_loss_after", "facts_kept", "first_loss", "final_loss",
           "heldout_loss", "knowledge_at_init", "attention_share",
           # newer runs only (a summary takes a metric every run has): stability, and the real model's text loss
           "early_grad_norm", "loss_spikes", "text_loss_step0", "text_loss_final")
TINY, REAL = "tinyworld", "smollm2"  # the bases: the embedded tiny world, SmolLM2-135M-Instruct
SPIKE = 1.5  # a loss spike: a step whose training loss is more than SPIKE times the step before's


# --------------------------------------------------------------------------- config
def study_train(base: str = TINY) -> TrainConfig:
    """Every run's training budget unless the study says otherwise (the seed is the run's). The real
    model: the demo's budget (adapterlab.worlds.smollm2), held-out evaluation at the end (generating the
    replies costs more than the training steps; the text loss is logged during the run instead)."""
    if base == TINY:
        return TrainConfig(steps=40, batch_size=16, lr=5e-2, warmup_steps=5, checkpoint=False,
                           progress=False)
    return TrainConfig(steps=40, batch_size=8, lr=1e-2, warmup_steps=2, eval_every=None, length_group=1,
                       checkpoint=False, progress=False)


def study_adapter(base: str = TINY) -> AdapterConfig:
    """K prompts in the top L layers of the base (each variant sets its gate and init): all 4 layers of
    the tiny world; 8 of the real model's 30."""
    return AdapterConfig(prompt_len=10, layers=4 if base == TINY else 8)


def study_variants(base: str = TINY) -> tuple[str, ...]:
    """The variants a study runs unless told: the three designs; on a real model also random_init_small."""
    return tuple(VARIANTS) if base == TINY else tuple(ALL_VARIANTS)


# What a run sets itself, whatever the study's TrainConfig says (not part of the study's settings).
PER_RUN = ("seed", "desc", "progress", "out_dir", "resume", "checkpoint", "log_every")


@dataclass
class AblationConfig:
    """One study: which base and variants, how many seeds, and the budget every run gets.

    base: "tinyworld" (the embedded tiny world) or a real LLaMA with a chat tokenizer that
        :func:`adapterlab.load_llama` reads ("smollm2"); train, adapter and variants left None take
        the base's defaults (:func:`study_train`, :func:`study_adapter`, :func:`study_variants`).
    train: the training budget of every run (steps, batch_size, lr, warmup_steps, eval_every: held-out
        evaluation every N steps, None: at the end only); each run sets its own seed.
    adapter: K prompts (prompt_len) in the top L layers (layers); each variant sets gate and init.
    gate_scale: multiplies the random gates' N(0, 1) draws (variant "random_init").
    small_gate_scale: the same for variant "random_init_small".
    prompt_scale: multiplies the prompts' N(0, 1) draws (every variant).
    train_records: use only the first N instruction records (None: all) - the small-data regime.
    early_steps: "early loss" is the mean training loss of the first early_steps steps.
    watch_every: the gates and the text loss are logged at steps 1, 2, 3, 5 and every watch_every-th.
    probe_docs: pretraining documents in the knowledge probe's loss (its fact probe asks every person; tiny world).
    n_train / n_heldout: facts per kind tuned on / held out; n_facts: general questions asked (None: all);
        text_tokens: the length of the English text whose loss is logged (a real base).
    """

    variants: Optional[tuple[str, ...]] = None
    seeds: int = 5
    train: Optional[TrainConfig] = None
    adapter: Optional[AdapterConfig] = None
    gate_scale: float = 1.0
    prompt_scale: float = 1.0
    train_records: Optional[int] = None
    early_steps: int = 10
    probe_docs: int = 48
    base: str = TINY
    small_gate_scale: float = 0.1
    watch_every: Optional[int] = None
    n_train: int = 24
    n_heldout: int = 20
    n_facts: Optional[int] = None
    text_tokens: int = 512

    def __post_init__(self) -> None:
        self.base = str(self.base)
        self.variants = study_variants(self.base) if self.variants is None else self.variants
        self.train = study_train(self.base) if self.train is None else self.train
        self.adapter = study_adapter(self.base) if self.adapter is None else self.adapter
        self.watch_every = (10 if self.base == TINY else 5) if self.watch_every is None else self.watch_every
        self.variants = tuple(method_name(v) for v in self.variants)  # older spellings: "zero", "random", "none"
        unknown = [v for v in self.variants if v not in ALL_VARIANTS]
        if unknown or not self.variants:
            raise ValueError(f"variants must be a non-empty subset of {tuple(ALL_VARIANTS)}; got {list(self.variants)}")
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants are listed twice: {list(self.variants)}")
        if not isinstance(self.train, TrainConfig) or self.train.steps is None:
            raise ValueError(f"train must be a TrainConfig with steps set; got {self.train!r}")
        if not isinstance(self.adapter, AdapterConfig):
            raise ValueError(f"adapter must be an AdapterConfig; got {self.adapter!r}")
        for name in ("seeds", "early_steps", "probe_docs", "watch_every", "n_train", "n_heldout", "text_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
        if self.n_facts is not None and (not isinstance(self.n_facts, int) or self.n_facts < 1):
            raise ValueError(f"n_facts must be an integer >= 1 or None (all); got {self.n_facts!r}")
        for name, value in (("lr", self.train.lr), ("gate_scale", self.gate_scale), ("prompt_scale", self.prompt_scale),
                            ("small_gate_scale", self.small_gate_scale)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a number > 0; got {value!r}")
        if self.train.warmup_steps is None or self.train.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0; got {self.train.warmup_steps!r}")
        if self.early_steps > self.train.steps:
            raise ValueError(f"early_steps={self.early_steps} is more than steps={self.train.steps}; lower it")
        if self.train.eval_every is not None and self.train.eval_every < 1:
            raise ValueError(f"eval_every must be an integer >= 1 or None; got {self.train.eval_every!r}")
        if self.train_records is not None and (not isinstance(self.train_records, int)
                                               or self.train_records < self.train.batch_size):
            raise ValueError(f"train_records must be at least one batch (batch_size={self.train.batch_size}); "
                             f"got {self.train_records!r}")

    def run_settings(self) -> dict:
        """What every run of the study shares, as runs.jsonl records it: the budget, K and L, the
        scales and the probe (and any other field of train or adapter set away from its default); on
        a real base also the base and its task (a tiny-world study writes these only when changed,
        so folders written before they existed still resume)."""
        t, a = self.train, self.adapter
        settings = {"steps": t.steps, "lr": t.lr, "batch_size": t.batch_size, "warmup_steps": t.warmup_steps,
                    "prompt_len": a.prompt_len, "layers": a.layers, "gate_scale": self.gate_scale,
                    "prompt_scale": self.prompt_scale, "train_records": self.train_records, "eval_every": t.eval_every,
                    "early_steps": self.early_steps, "probe_docs": self.probe_docs}
        later = {"base": self.base, "small_gate_scale": self.small_gate_scale, "watch_every": self.watch_every,
                 "n_train": self.n_train, "n_heldout": self.n_heldout, "n_facts": self.n_facts,
                 "text_tokens": self.text_tokens}
        if self.base == TINY:
            tiny = AblationConfig()
            later = {k: v for k, v in later.items() if v != getattr(tiny, k)}
        else:
            del settings["probe_docs"]  # the tiny world's probe
        settings.update(later)
        for given, default in ((t, study_train(self.base)), (a, study_adapter(self.base))):
            settings.update({k: v for k, v in asdict(given).items()
                             if k not in settings and k not in PER_RUN and v != getattr(default, k)})
        return settings

    def adapter_config(self, variant: str) -> AdapterConfig:
        return replace(self.adapter, **ALL_VARIANTS[variant])

    def gate_scale_of(self, variant: str) -> float:
        """What the variant's random gate draws are multiplied by (zero gates stay zero whatever it is)."""
        return self.small_gate_scale if variant == "random_init_small" else self.gate_scale


# --------------------------------------------------------------------------- the bench
@dataclass
class Bench:
    """Everything the runs share: the world, the data and a way to get a fresh base.

    The tiny world's bench has its pretraining text (corpus_data) and its world (the people whose facts
    the base learned); a real model's has held-out English text (text) and general questions (facts),
    and its world is the task (:class:`adapterlab.worlds.smollm2.Task`, heldout_records its held-out items).
    """

    world: object
    tokenizer: object
    train_data: object
    heldout_records: list
    heldout_data: object
    corpus_data: object
    probe_tokens: torch.Tensor  # a fixed batch of held-out prompts, for the prompts' attention share
    load_base: Callable[[], torch.nn.Module]
    text: Optional[torch.Tensor] = None  # a real model: English text the tuning never sees, (1, T)
    facts: Sequence[tuple[str, ...]] = ()  # a real model: general questions (question, answer, also...)

    @property
    def real(self) -> bool:
        return self.text is not None


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
    if len(train_data) < config.train.batch_size:
        raise ValueError(f"the instruction set has {len(train_data)} records, fewer than "
                         f"batch_size={config.train.batch_size}")
    heldout_data = instruction_dataset(heldout_records, tokenizer, max_seq_len=256, source="held-out set")
    corpus_data = text_windows(corpus_tokens(tokenizer, list(corpus)[: config.probe_docs]), 64,
                               source="pretraining text")
    probe_tokens, _ = collate([heldout_data[i] for i in range(min(8, len(heldout_data)))])
    return Bench(world, tokenizer, train_data, list(heldout_records), heldout_data, corpus_data, probe_tokens,
                 load_base)


def real_bench(config: AblationConfig, base: Optional[torch.nn.Module] = None) -> Bench:
    """A real model's bench: :mod:`adapterlab.worlds.smollm2`'s task (facts of three kinds, the held-out
    facts never tuned on), its English text and general questions. base: a loaded Llama with a chat
    tokenizer in ``.tokenizer`` (default: ``load_llama(config.base)`` on the CPU, in fp32); it is kept
    untouched and every run gets a copy."""
    from ..worlds import smollm2
    from ..worlds.tinyworld import load_llama

    if base is None:
        base = load_llama(config.base, device="cpu", dtype=torch.float32)
    tokenizer = getattr(base, "tokenizer", None)
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"ablate --base {config.base}: the model has no tokenizer with a chat template; give a real "
                         "model that has one (smollm2), or tinyworld for the embedded tiny world")
    base.requires_grad_(False)
    task = smollm2.make_task(config.n_train, config.n_heldout, seed=0)  # the same split for every seed
    records = [it.record() for it in task.train][: config.train_records]
    train_data = smollm2.chat_dataset(tokenizer, records, source=f"{config.base} task")
    if len(train_data) < config.train.batch_size:
        raise ValueError(f"the task has {len(train_data)} training facts, fewer than batch_size="
                         f"{config.train.batch_size}; lower the batch size or raise n_train")
    heldout_data = smollm2.chat_dataset(tokenizer, [it.record() for it in task.heldout], source="held-out facts")
    probe_tokens, _ = collate([heldout_data[i] for i in range(min(8, len(heldout_data)))])
    text = smollm2.text_tokens(tokenizer, min(config.text_tokens, base.config.max_seq_len))
    facts = smollm2.GENERAL_FACTS[: config.n_facts]
    return Bench(task, tokenizer, train_data, list(task.heldout), heldout_data, None, probe_tokens,
                 lambda: copy.deepcopy(base), text=text, facts=facts)


def study_bench(config: AblationConfig) -> Bench:
    """The bench of the config's base: the tiny world's, or a real model's."""
    return tiny_world_bench(config) if config.base == TINY else real_bench(config)


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
def knowledge(model, bench: Bench, facts: bool = True) -> dict:
    """What the model knows of its pretraining: ``corpus_loss``, the loss on its pretraining text (a real
    model: on English text the tuning never sees), and unless ``facts`` is False ``fact_accuracy``: the
    share of every person's facts it completes in the pretraining's own words, no template (a real
    model: the share of general questions its chat reply still answers)."""
    from ..worlds import smollm2

    was_training = model.training
    model.eval()
    try:
        if bench.real:
            result = {"corpus_loss": smollm2.text_loss(model, bench.text)}
            if facts:
                result["fact_accuracy"] = smollm2.accuracy(smollm2.probe_facts(model, bench.tokenizer, bench.facts),
                                                           "known")
        else:
            result = {"corpus_loss": mean_loss(model, bench.corpus_data)}
            if facts:
                result["fact_accuracy"] = fact_completion_accuracy(model, bench.tokenizer, bench.world)
    finally:
        model.train(was_training)
    return result


@torch.no_grad()
def evaluate(model, bench: Bench) -> dict:
    """The task: the share of held-out questions answered right, and the loss on their answers."""
    from ..worlds import smollm2
    from ..worlds.tinyworld import heldout_accuracy

    if bench.real:  # the reply's last line must be "Answer: X" with X right (smollm2.is_correct)
        accuracy = smollm2.accuracy(smollm2.score_task(model, bench.tokenizer, bench.heldout_records))
    else:
        accuracy = heldout_accuracy(model, bench.tokenizer, bench.heldout_records)
    return {"heldout_accuracy": accuracy, "heldout_loss": mean_loss(model, bench.heldout_data)}


@torch.no_grad()
def attention_share(model, tokens: torch.Tensor) -> float:
    """The prompts' share of the attention weight, averaged over adapted layers, heads and positions.

    Gated layers: out = attention over tokens + g * attention over prompts, so the prompts' weight
    is |g| against the tokens' 1: share |g| / (1 + |g|). Ungated layers: the softmax mass on the
    prompts, w = sigmoid(lse(S^K) - lse(S^{M+1})) of :func:`adapterlab.studies.variants.joint_prompt_attention`.
    (Not :mod:`adapterlab.gates`' ``prompt_share``: that one is the prompts' share of the head's output.)
    """
    return attention_shares(model, tokens)[0]


@torch.no_grad()
def attention_shares(model, tokens: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(:func:`attention_share`, the same per adapted layer and head (L, H)): one forward pass on ``tokens``."""
    H = model.config.n_heads

    def gated_share(module) -> torch.Tensor:  # |g| / (1 + |g|): one per layer or per head
        g = module.gate_value().detach().abs().float().reshape(-1)
        return g / (1 + g)

    adapters = [model.layers[i].attention.adapter for i in adapted_layers(model)]
    if all(ap.gate is not None for ap in adapters):  # gated layers only: the gates say it, no forward pass
        per_layer = [gated_share(ap) for ap in adapters]
        return (sum(s.mean().item() for s in per_layer) / len(per_layer),
                torch.stack([s.expand(H) for s in per_layer]))
    shares, by_head, hooks = [], [], []

    def capture(module, args, kwargs, output):
        q, attn = args[0], args[1]
        if module.gate is not None:
            share = gated_share(module)
            shares.append(share.mean().item())
            by_head.append(share.expand(H))  # (H,)
            return
        keys = kwargs["keys"]
        pk, _ = module.prompt_kv(attn)
        rep = q.shape[1] // keys.shape[1]
        keys, pk = keys.repeat_interleave(rep, 1), pk.to(q.dtype).repeat_interleave(rep, 1)
        d, T = q.shape[-1], q.shape[2]
        s_p = (q @ pk.transpose(-2, -1)).float() / math.sqrt(d)
        s_t = (q @ keys.transpose(-2, -1)).float() / math.sqrt(d)
        s_t = s_t.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))
        w = torch.sigmoid(s_p.logsumexp(-1) - s_t.logsumexp(-1))  # (B, H, T)
        shares.append(w.mean().item())
        by_head.append(w.mean(dim=(0, 2)))  # (H,)

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
    return sum(shares) / len(shares), torch.stack(by_head)


def gate_record(model, step: int, bench: Bench) -> dict:
    """The gates and prompts at one step: the gates per layer and head (``layers``: the gated layers,
    ``gates``: (L, H) effective gates, as :mod:`adapterlab.gates` records them; none for ungated
    prompts), their mean |gate| over the layers, the prompts' RMS and their attention share (also per
    adapted layer and head)."""
    gates, norms = [], []
    for i in adapted_layers(model):
        ap = model.layers[i].attention.adapter
        norms.append(ap.prompt.detach().float().pow(2).mean().sqrt().item())  # RMS of the prompt values
        if ap.gate is not None:
            gates.append(ap.gate_value().detach().abs().float().mean().item())
    share, share_by_head = attention_shares(model, bench.probe_tokens)
    return {"step": step, "layers": gated_layers(model), "gates": gate_values(model).tolist(),  # (L gated, H)
            "gate_abs": sum(gates) / len(gates) if gates else None, "prompt_rms": sum(norms) / len(norms),
            "attention_share": share, "attention_share_by_head": share_by_head.tolist()}  # (L adapted, H)


# --------------------------------------------------------------------------- one run
def attach(model, config: AblationConfig, variant: str, seed: int):
    """Attach the variant's adapter (prompts and random gates drawn from ``seed``), scaled as configured."""
    attach_prompts = add_ungated_prompts if variant == "ungated" else add_adapter
    attach_prompts(model, config.adapter_config(variant), seed=seed)
    with torch.no_grad():
        for i in adapted_layers(model):
            ap = model.layers[i].attention.adapter
            ap.prompt.mul_(config.prompt_scale)
            if ap.gate is not None:
                ap.gate.mul_(config.gate_scale_of(variant))  # zero gates stay zero
    return model


def watched(step: int, every: int) -> bool:
    """Whether the gates and the text loss are logged after ``step``: 1, 2, 3, 5 and every ``every``-th."""
    return step in (1, 2, 3, 5) or step % every == 0


def loss_spikes(losses: Sequence[float], factor: float = SPIKE) -> int:
    """How many steps' training loss is more than ``factor`` times the step before's."""
    return sum(b > factor * a for a, b in zip(losses, losses[1:]))


def run_one(bench: Bench, config: AblationConfig, variant: str, seed: int, progress: bool = False) -> dict:
    """Train one variant with one seed on a fresh base; return the run's record (JSON-ready).
    progress: a bar over the run's steps."""
    t0 = time.perf_counter()
    model = attach(bench.load_base(), config, variant, seed)
    before = knowledge(model, bench)
    gate_log = [gate_record(model, 0, bench)]
    knowledge_log = [{"step": 0, **before}]
    losses: list[float] = []
    grad_norms: list[float] = []

    def on_step(step: int, info: dict) -> None:
        losses.append(info["loss"])
        grad_norms.append(info["grad_norm"])
        last = step == info["total_steps"]
        if watched(step, config.watch_every) or last:
            gate_log.append(gate_record(model, step, bench))
        if not last and (info["eval"] is not None or watched(step, config.watch_every)):  # the end: knowledge_after
            knowledge_log.append({"step": step, **knowledge(model, bench, facts=info["eval"] is not None)})

    tc = replace(config.train, checkpoint=False, progress=progress, out_dir=None, seed=seed,
                 desc=f"{variant} seed {seed}")
    metrics = train(model, bench.train_data, tc, eval_fn=lambda m: evaluate(m, bench), callbacks=[on_step])
    evals = metrics["eval_history"]
    after = knowledge(model, bench)
    knowledge_log.append({"step": metrics["steps"], **after})
    final = evals[-1]
    early = config.early_steps
    record = {
        "variant": variant, "seed": seed, "settings": config.run_settings(),
        "heldout_accuracy": final["heldout_accuracy"], "heldout_loss": final["heldout_loss"],
        "early_loss": sum(losses[:early]) / early, "early_grad_norm": sum(grad_norms[:early]) / early,
        "loss_spikes": loss_spikes(losses),
        "first_loss": losses[0], "final_loss": sum(losses[-10:]) / len(losses[-10:]),
        "pretrain_loss_after": after["corpus_loss"], "facts_kept": after["fact_accuracy"],
        "knowledge_at_init": before["corpus_loss"], "attention_share": gate_log[-1]["attention_share"],
    }
    if bench.real:  # the same numbers under the real model's names: loss on held-out English text
        record.update(text_loss_step0=before["corpus_loss"], text_loss_final=after["corpus_loss"])
    return {
        **record, "knowledge_before": before, "knowledge_after": after, "knowledge_log": knowledge_log,
        "losses": losses, "grad_norms": grad_norms, "eval_history": evals, "gate_log": gate_log,
        "steps_per_epoch": metrics["steps_per_epoch"], "trainable_params": metrics["trainable_params"],
        "seconds": round(time.perf_counter() - t0, 1),
    }


# --------------------------------------------------------------------------- the study
def run_ablation(out_dir: str | os.PathLike, config: Optional[AblationConfig] = None, progress: bool = True,
                 command: Optional[str] = None, bench: Optional[Bench] = None, plot: bool = True,
                 threads: Optional[int] = None) -> dict:
    """Run every (variant, seed) of the study not yet in ``out_dir/runs.jsonl``; write the summary
    and the plots; return the summary. Safe to interrupt: the next call redoes only what is missing.

    Raises ValueError if ``out_dir`` holds runs made with other settings (use a new folder).
    threads: CPU threads for torch (None: $ADAPTERLAB_THREADS, default 1; 0: leave torch's setting) -
    one per process for the real model too: run several studies side by side rather than one on more threads.
    bench: the runs' shared data and base (default: :func:`study_bench` of the config's base).
    """
    config = config or AblationConfig()
    out = harness.study_folder(out_dir)
    runs_path = out / RUNS_NAME
    runs = read_runs(runs_path)
    harness.check_settings(runs, config.run_settings(), runs_path)
    done = {(r["variant"], r["seed"]) for r in runs}
    todo = [(v, s) for s in range(config.seeds) for v in config.variants if (v, s) not in done]
    if todo:
        with cpu_threads(default_threads() if threads is None else threads):
            bench = bench or study_bench(config)
            bar = harness.study_bar(len(todo), desc="ablation runs", progress=progress)
            run = lambda vs: run_one(bench, config, *vs, progress=progress and bench.real)  # noqa: E731
            harness.run_missing(todo, run, runs, runs_path, bar, label=lambda vs: f"{vs[0]}, seed {vs[1]}")
            if bar is not None:
                bar.close()
    wanted = [r for r in runs if r["variant"] in config.variants and r["seed"] < config.seeds]
    summary = summarize(wanted, config, command=command, threads=default_threads() if threads is None else threads)
    atomic_write_text(out / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
    if plot:
        plot_study(wanted, out / PLOT_NAME)
    return summary


def read_study(folder: str | os.PathLike) -> tuple[list[dict], dict]:
    """(runs, summary) of a study folder, with today's names (committed studies were written with
    "zero", "random", "none", "knowledge_kept" and "prompt_share")."""
    folder = Path(folder)
    summary = json.loads((folder / SUMMARY_NAME).read_text())
    summary["variants"] = harness.upgrade_keys(summary["variants"])
    return read_runs(folder / RUNS_NAME), summary


# --------------------------------------------------------------------------- statistics
def summarize(runs: Sequence[dict], config: AblationConfig, command: Optional[str] = None,
              threads: Optional[int] = None) -> dict:
    """The study's summary: per variant, mean/std/95% interval over seeds of every metric
    (threads: those the runs used, for the record; None: torch's now)."""
    variants = variant_stats(runs, config.variants)
    base = next((r["knowledge_before"] for r in runs if r["variant"] == "zero_init"), None)
    return {"variants": variants, "base_knowledge": base, "comparisons": comparisons(runs), "settings": config.run_settings(),
            "command": command or f"adapterlab.studies.ablate.run_ablation(config={config!r})",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": harness.machine(threads),
            "run_seconds": sum(r["seconds"] for r in runs)}


def variant_stats(runs: Sequence[dict], variants: Sequence[str]) -> dict:
    """{variant: {"seeds": n, metric: stats over its seeds}} for every metric all its runs have."""
    table = {}
    for v in variants:
        rows = [r for r in runs if r["variant"] == v]
        if rows:  # runs written before a metric existed: no stats for it
            table[v] = {"seeds": len(rows), **{m: stats([r[m] for r in rows]) for m in METRICS
                                               if all(m in r for r in rows)}}
    return table


LOWER_IS_BETTER = {"early_loss": True, "first_loss": True, "final_loss": True, "heldout_loss": True,
                   "pretrain_loss_after": True, "knowledge_at_init": True, "heldout_accuracy": False,
                   "facts_kept": False, "early_grad_norm": True, "loss_spikes": True, "text_loss_step0": True, "text_loss_final": True}
METRIC_NAMES = {"heldout_accuracy": "held-out accuracy", "early_loss": "early training loss",
                "pretrain_loss_after": "loss on the pretraining text after training", "facts_kept": "facts kept",
                "first_loss": "first-step loss", "final_loss": "final training loss", "heldout_loss": "held-out loss",
                "knowledge_at_init": "loss on the pretraining text at step 0",
                "early_grad_norm": "early gradient norm", "loss_spikes": "loss spikes",
                "text_loss_step0": "loss on the English text at step 0",
                "text_loss_final": "loss on the English text after training"}
# A real base: its "pretraining text" is held-out English (Python's docs), its "facts" general questions.
REAL_METRIC_NAMES = {**METRIC_NAMES, "pretrain_loss_after": "loss on the English text after training",
                     "knowledge_at_init": "loss on the English text at step 0",
                     "facts_kept": "general questions still answered"}


def metric_names(summary: Optional[dict] = None) -> dict:
    """The metrics' names in words for a study's summary (a real base's knowledge probe is English text)."""
    return METRIC_NAMES if (summary or {}).get("settings", {}).get("base", TINY) == TINY else REAL_METRIC_NAMES


def compare(runs: Sequence[dict], metric: str, a: str = "zero_init", b: str = "random_init") -> dict:
    """Variant a against variant b on one metric, paired by seed (same seed: same data order and
    prompt draws). Returns the paired difference's stats and a verdict: "better" or "worse" when its
    95% interval excludes 0, "no clear difference" otherwise."""
    metric = harness.OLD_FIELDS.get(metric, metric)
    a, b = method_name(a), method_name(b)
    by_seed = {v: {r["seed"]: r[metric] for r in runs if r["variant"] == v} for v in (a, b)}
    try:
        result = harness.paired(by_seed[a], by_seed[b], LOWER_IS_BETTER[metric])
    except ValueError as e:
        raise ValueError(f"comparing {a} with {b}: {e}") from None
    return {"metric": metric, "a": a, "b": b, "a_mean": stats(by_seed[a].values())["mean"],
            "b_mean": stats(by_seed[b].values())["mean"], **result}


VERDICT_METRICS = ("early_loss", "heldout_accuracy", "pretrain_loss_after", "facts_kept")


def comparisons(runs: Sequence[dict], metrics: Sequence[str] = VERDICT_METRICS) -> list[dict]:
    """The study's paired verdicts: its first variant (zero_init when run) against each other one,
    on each metric (:func:`compare`); [] when fewer than 2 seeds were run for both."""
    present = [v for v in ALL_VARIANTS if any(r["variant"] == v for r in runs)]
    seeds = {v: {r["seed"] for r in runs if r["variant"] == v} for v in present}
    return [compare(runs, m, present[0], other) for other in present[1:]
            if len(seeds[present[0]] & seeds[other]) >= 2 for m in metrics]


def sentence(c: dict, digits: int = 3, names: Optional[dict] = None) -> str:
    """A comparison from :func:`compare` in words, with its numbers (names: :func:`metric_names`)."""
    lo, hi = c["difference"]["ci95"]
    f = f"{{:.{digits}f}}"
    names = names or METRIC_NAMES
    return (f"{LABELS[c['a']]} {VERBS[c['verdict']]} {LABELS[c['b']]} on {names[c['metric']]}: "
            f"{f.format(c['a_mean'])} vs {f.format(c['b_mean'])} (paired difference {f.format(c['difference']['mean'])}, "
            f"95% interval [{f.format(lo)}, {f.format(hi)}], {c['difference']['n']} seeds)")


# The table's columns: (metric, title, digits).
TABLE_COLUMNS = (("heldout_accuracy", "held-out acc", 2), ("early_loss", "early loss", 3),
                 ("pretrain_loss_after", "corpus loss after", 3), ("facts_kept", "facts kept", 2),
                 ("knowledge_at_init", "corpus loss at init", 3))
# What each column measures, and which way is better ({early} is the study's early_steps).
COLUMN_MEANINGS = {
    "heldout_accuracy": "share of held-out questions answered right after training (higher is better)",
    "early_loss": "mean training loss of the first {early} steps (lower is better: learns faster)",
    "pretrain_loss_after": "loss on the base's pretraining text after training (lower is better: more of the base kept)",
    "facts_kept": "share of every person's facts completed in the pretraining's words after training "
                  "(higher is better: more kept)",
    "knowledge_at_init": "loss on the pretraining text at step 0, adapter attached (lower is better: the frozen "
                         "base's is the floor, and zero-init sits on it)",
}
# A real base: the columns' titles and meanings where its probe differs from the tiny world's.
REAL_TITLES = {"pretrain_loss_after": "text loss after", "facts_kept": "questions kept",
               "knowledge_at_init": "text loss at step 0"}
REAL_MEANINGS = {
    "pretrain_loss_after": "loss on held-out English text (Python's docs) after training (lower is better: more of "
                           "the base kept)",
    "facts_kept": "share of general questions the chat reply still answers after training (higher is better: "
                  "more kept)",
    "knowledge_at_init": "loss on the English text at step 0, adapter attached (lower is better: the frozen base's is "
                         "the floor, and zero-init sits on it)",
}


def is_real(summary: dict) -> bool:
    return (summary.get("settings") or {}).get("base", TINY) != TINY


def format_table(summary: dict) -> str:
    """The study as a text table: mean +- std over seeds per variant."""
    def cell(row: dict, metric: str, p: int) -> str:
        return harness.mean_pm_std(row[metric]["mean"], row[metric]["std"], p)

    real = is_real(summary)
    rows = [[LABELS[v], f"{row['seeds']:d}", *(cell(row, m, p) for m, _, p in TABLE_COLUMNS)]
            for v, row in harness.upgrade_keys(summary["variants"]).items()]
    titles = [REAL_TITLES.get(m, title) if real else title for m, title, _ in TABLE_COLUMNS]
    table = harness.format_table(["variant", "seeds", *titles], rows, [24, 5] + [19] * len(TABLE_COLUMNS))
    base = summary.get("base_knowledge")
    if base and real:
        table += (f"\n(frozen base: English text loss {base['corpus_loss']:.3f}, general questions answered "
                  f"{base['fact_accuracy']:.2f})")
    elif base:
        table += f"\n(frozen base: corpus loss {base['corpus_loss']:.3f}, facts {base['fact_accuracy']:.2f})"
    return table


def _stability_line(summary: dict) -> str:
    """Early training, per variant: mean gradient norm of the first steps and the loss spikes, and the
    loss on the English text at step 0 and at the end."""
    early = (summary.get("settings") or {}).get("early_steps", "early")
    parts = []
    for v, row in harness.upgrade_keys(summary["variants"]).items():
        if all(m in row for m in ("early_grad_norm", "loss_spikes", "text_loss_step0", "text_loss_final")):
            parts.append(f"  {LABELS[v]:24s} grad norm {row['early_grad_norm']['mean']:.3f}, spikes "
                         f"{row['loss_spikes']['mean']:.1f}, text loss {row['text_loss_step0']['mean']:.3f} -> "
                         f"{row['text_loss_final']['mean']:.3f}")
    return (f"early training (mean over the first {early} steps; a spike: a step's loss above {SPIKE} x the step "
            f"before's) and the English text's loss, step 0 -> end:\n" + "\n".join(parts))


def seeds_warning(summary: dict) -> Optional[str]:
    """A warning when a variant has fewer than ``harness.MIN_SEEDS`` seeds (None otherwise)."""
    seeds = min((row["seeds"] for row in summary["variants"].values()), default=0)
    if seeds >= MIN_SEEDS:
        return None
    return (f"warning: with {seeds} seed{'s' if seeds != 1 else ''} the table can look like a win the {MIN_SEEDS}-seed "
            f"study refutes (docs/results/ablations/README.md: with 3 seeds, lr 0.2 gave zero-init a clear lead on "
            f"held-out accuracy that 5 seeds took back); rerun with --seeds {MIN_SEEDS} before drawing a conclusion")


def report(summary: dict) -> str:
    """The study in words, as ``adapterlab ablate`` prints it: the table (:func:`format_table`), what
    each column means and which way is better, the paired verdicts (:func:`sentence`) and a warning
    below ``harness.MIN_SEEDS`` seeds."""
    early = (summary.get("settings") or {}).get("early_steps", "early")
    real = is_real(summary)
    lines = [format_table(summary), "", "columns (mean +- std over seeds):"]
    for m, title, _ in TABLE_COLUMNS:
        title, meaning = (REAL_TITLES.get(m, title), REAL_MEANINGS.get(m, COLUMN_MEANINGS[m])) if real else \
            (title, COLUMN_MEANINGS[m])
        lines.append(f"  {title:20s} {meaning.format(early=early)}")
    if real:
        lines.append(_stability_line(summary))
    found = summary.get("comparisons") or []
    lines.append("")
    if found:
        lines.append("paired by seed (same seed: same data order and prompt draws); \"beats\" or \"loses to\" only "
                     "where the 95% interval of the paired difference excludes 0:")
        lines += [f"- {sentence(c, names=metric_names(summary))}" for c in found]
    else:
        lines.append("no paired comparison in this summary: it needs two variants run with at least 2 common seeds")
    warning = seeds_warning(summary)
    if warning:
        lines += ["", warning]
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots
def _pyplot(path):
    """matplotlib.pyplot, on the Agg backend when the figure goes to a file outside a notebook."""
    import matplotlib

    if path is not None and matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _saved(fig, path, dpi: int):
    """Lay the figure out; write it to ``path`` and close it when given. Returns the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
    return fig


def plot_study(runs: Sequence[dict], path: Optional[str | os.PathLike] = None, title: str = ""):
    """Four panels: loss curves with bands (Fig. 5), held-out accuracy with error bars (Table 5),
    knowledge kept, and how far the prompts are let in during training: their attention share
    (solid, every variant) and the gated variants' mean |gate| (dashed); runs that logged their
    knowledge during training (knowledge_log) get a fifth: the text loss over the steps. Returns the figure."""
    plt = _pyplot(path)
    import numpy as np

    variants = [v for v in ALL_VARIANTS if any(r["variant"] == v for r in runs)]
    logged = all("knowledge_log" in r for r in runs)
    text = "English text (Python's docs)" if all("text_loss_final" in r for r in runs) else "pretraining text"
    fig, axes = plt.subplots(1, 5 if logged else 4, figsize=(22.5 if logged else 18, 3.6))
    for v in variants:
        rows = [r for r in runs if r["variant"] == v]
        losses = np.array([r["losses"] for r in rows])  # (seeds, steps)
        steps = np.arange(1, losses.shape[1] + 1)
        m, s = losses.mean(0), losses.std(0)
        axes[0].plot(steps, m, color=COLORS[v], label=f"{LABELS[v]} (n={len(rows)})")
        axes[0].fill_between(steps, m - s, m + s, color=COLORS[v], alpha=0.2)
        shares = np.array([[g["attention_share"] for g in r["gate_log"]] for r in rows])  # (seeds, records)
        gsteps = [g["step"] for g in rows[0]["gate_log"]]
        axes[3].plot(gsteps, shares.mean(0), color=COLORS[v])
        axes[3].fill_between(gsteps, shares.mean(0) - shares.std(0), shares.mean(0) + shares.std(0),
                             color=COLORS[v], alpha=0.2)
        if rows[0]["gate_log"][0]["gate_abs"] is not None:  # gated: the gates themselves
            gate_abs = np.array([[g["gate_abs"] for g in r["gate_log"]] for r in rows])
            axes[3].plot(gsteps, gate_abs.mean(0), color=COLORS[v], ls="--")
        if logged:  # the knowledge kept during training
            kept = np.array([[k["corpus_loss"] for k in r["knowledge_log"]] for r in rows])  # (seeds, records)
            ksteps = [k["step"] for k in rows[0]["knowledge_log"]]
            axes[4].plot(ksteps, kept.mean(0), color=COLORS[v], marker=".")
            axes[4].fill_between(ksteps, kept.mean(0) - kept.std(0), kept.mean(0) + kept.std(0), color=COLORS[v],
                                 alpha=0.2)
    x = np.arange(len(variants))
    for ax, metric, ylabel in ((axes[1], "heldout_accuracy", "held-out accuracy"),
                               (axes[2], "pretrain_loss_after", "loss on pretraining text")):
        means = [np.mean([r[metric] for r in runs if r["variant"] == v]) for v in variants]
        stds = [np.std([r[metric] for r in runs if r["variant"] == v], ddof=1) if
                sum(r["variant"] == v for r in runs) > 1 else 0 for v in variants]
        ax.bar(x, means, yerr=stds, capsize=4, color=[COLORS[v] for v in variants])
        for v, xi in zip(variants, x):
            ys = [r[metric] for r in runs if r["variant"] == v]
            ax.scatter([xi] * len(ys), ys, color="k", s=10, zorder=3)
        ax.set_xticks(x, [v for v in variants], fontsize=8 if len(variants) > 3 else None)
        ax.set_ylabel(ylabel if metric == "heldout_accuracy" else f"loss on {text}", fontsize=8)
    base = next((r["knowledge_before"]["corpus_loss"] for r in runs if r["variant"] == "zero_init"), None)
    if base is not None:
        for ax in axes[2::2]:  # the knowledge panels
            ax.axhline(base, color="k", ls="--", lw=1, label="frozen base")
            ax.legend(fontsize=8)
    if logged:
        axes[4].set(xlabel="step", title="knowledge kept during training")
        axes[4].set_ylabel(f"loss on {text} (mean +- std)", fontsize=8)
    axes[0].set_yscale("log")
    axes[0].set(xlabel="step", ylabel="training loss (mean +- std)", title="loss curves (Fig. 5)")
    axes[1].set(ylim=(0, 1), title="held-out accuracy (Table 5)")
    axes[2].set(title="knowledge kept (lower: more kept)")
    axes[3].set(xlabel="step", ylabel="gated: |g|/(1+|g|); ungated: softmax mass",
                title="prompts' attention share and mean |gate|")
    axes[3].yaxis.label.set_fontsize(8)
    styles = [plt.Line2D([], [], color="k"), plt.Line2D([], [], color="k", ls="--")]  # colours: the first panel's
    axes[3].legend(styles, ["prompts' attention share (mean +- std)", "mean |gate| (gated variants)"], fontsize=7)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _saved(fig, path, dpi=90)


def plot_regimes(studies: dict[str, Sequence[dict]], path: Optional[str | os.PathLike] = None,
                 metrics: Sequence[str] = ("early_loss", "heldout_accuracy", "pretrain_loss_after")):
    """One panel per metric: mean +- std over seeds of every variant, grouped by study (regime).
    studies: {label: runs}. Returns the figure (saved to ``path`` when given)."""
    plt = _pyplot(path)
    import numpy as np

    metrics = [harness.OLD_FIELDS.get(m, m) for m in metrics]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.6))
    for ax, metric in zip(np.atleast_1d(axes), metrics):
        _regime_bars(ax, studies, metric, METRIC_NAMES)
    np.atleast_1d(axes)[0].legend(fontsize=8)
    return _saved(fig, path, dpi=90)


def _regime_bars(ax, studies: dict[str, Sequence[dict]], metric: str, names: dict) -> None:
    """One metric's bars on ``ax``: mean +- std over seeds per variant, grouped by study, seeds as dots."""
    import numpy as np

    labels = list(studies)
    present = [v for v in ALL_VARIANTS if any(r["variant"] == v for runs in studies.values() for r in runs)]
    width = 0.8 / max(1, len(present))
    for j, v in enumerate(present):
        xs, means, stds = [], [], []
        for i, label in enumerate(labels):
            ys = [r[metric] for r in studies[label] if r["variant"] == v]
            if ys:
                xs.append(i + (j - (len(present) - 1) / 2) * width)
                means.append(np.mean(ys))
                stds.append(np.std(ys, ddof=1) if len(ys) > 1 else 0.0)
                ax.scatter([xs[-1]] * len(ys), ys, color="k", s=8, zorder=3)
        if xs:
            ax.bar(xs, means, width, yerr=stds, capsize=3, color=COLORS[v], label=LABELS[v])
    ax.set_xticks(range(len(labels)), labels)
    ax.set_title(names[metric] + (" (lower: better)" if LOWER_IS_BETTER[metric] else ""), fontsize=10)


# --------------------------------------------------------------------------- a grid of studies
GRID_PLOT = "grid.png"
# The grid's verdicts: the study's, plus the real model's start (step-0 text loss) and its early gradients.
GRID_METRICS = VERDICT_METRICS + ("text_loss_step0", "early_grad_norm")
# The tiny-world schema's older name for the loss on the base's text after training (the issue's and older files').
GRID_ALIASES = {"knowledge_kept": "pretrain_loss_after"}


def grid_cells(folder: str | os.PathLike) -> list[tuple[str, list[dict], dict]]:
    """The studies in ``folder``'s subfolders (each an ``adapterlab ablate --out``) as (name, runs,
    summary), ordered by adapted layers then learning rate; a study still running gives its finished runs."""
    cells = []
    for sub in sorted(p for p in Path(folder).iterdir() if (p / RUNS_NAME).is_file()):
        runs = read_runs(sub / RUNS_NAME)
        if not runs:
            continue
        summary = json.loads((sub / SUMMARY_NAME).read_text()) if (sub / SUMMARY_NAME).is_file() else {}
        cells.append((sub.name, runs, summary))
    return sorted(cells, key=lambda c: (c[1][0]["settings"]["layers"], c[1][0]["settings"]["lr"], c[0]))


def collect_grid(folder: str | os.PathLike, command: Optional[str] = None, plot: bool = True) -> dict:
    """One summary of the studies in ``folder``'s subfolders (a grid over adapted layers and learning
    rates, say): per cell its settings, every variant's stats over seeds (:func:`variant_stats`, plus
    ``knowledge_kept``, the tiny-world schema's name for ``pretrain_loss_after``) and the paired
    verdicts of zero-init against each other variant on :data:`GRID_METRICS`. Writes
    ``folder/summary.json`` and (``plot``) ``folder/grid.png``; returns the summary."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; give the folder whose subfolders hold adapterlab ablate studies")
    found = grid_cells(folder)
    if not found:
        raise ValueError(f"{folder} has no study in its subfolders (a subfolder with runs.jsonl); run "
                         f"adapterlab ablate --out {folder}/NAME first")
    cells = []
    for name, runs, summary in found:
        settings = runs[0]["settings"]
        variants = [v for v in ALL_VARIANTS if any(r["variant"] == v for r in runs)]
        table = variant_stats(runs, variants)
        for row in table.values():
            row.update({old: row[new] for old, new in GRID_ALIASES.items() if new in row})
        cells.append({
            "name": name, "layers": settings["layers"], "lr": settings["lr"], "settings": settings,
            "variants": table, "comparisons": comparisons(runs, GRID_METRICS),
            "base_knowledge": next((r["knowledge_before"] for r in runs if r["variant"] == "zero_init"), None),
            "command": summary.get("command"), "date": summary.get("date"), "machine": summary.get("machine"),
            "run_seconds": sum(r["seconds"] for r in runs)})
    grid = {"cells": cells, "aliases": GRID_ALIASES,
            "command": command or f"adapterlab.studies.ablate.collect_grid({str(folder)!r})",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": harness.machine()}
    atomic_write_text(folder / SUMMARY_NAME, json.dumps(grid, indent=2) + "\n")
    if plot:
        plot_grid({cell_label(c): runs for c, (_, runs, _) in zip(cells, found)}, folder / GRID_PLOT)
    return grid


def cell_label(cell: dict) -> str:
    """A grid cell's short name: its adapted layers and learning rate."""
    return f"L={cell['layers']}, lr {cell['lr']:g}"


def cell_verdict(cell: dict, metric: str, other: str, a: str = "zero_init") -> Optional[str]:
    """``a``'s paired verdict against ``other`` on ``metric`` in one grid cell (None: not compared there)."""
    return next((c["verdict"] for c in cell["comparisons"] if (c["a"], c["b"], c["metric"]) == (a, other, metric)),
                None)


def grid_verdict(grid: dict, metric: str, other: str, a: str = "zero_init") -> dict:
    """How ``a`` fared against ``other`` on ``metric`` across the grid's cells: {verdict: [cell labels]}."""
    tally: dict = {}
    for cell in grid["cells"]:
        verdict = cell_verdict(cell, metric, other, a)
        if verdict is not None:
            tally.setdefault(verdict, []).append(cell_label(cell))
    return tally


SHORT_VERDICTS = {"better": "beats", "worse": "loses", "no clear difference": "-"}


def verdict_matrix(grid: dict, metrics: Sequence[str] = VERDICT_METRICS + ("text_loss_step0",),
                   others: Optional[Sequence[str]] = None, a: str = "zero_init") -> str:
    """Zero-init's paired verdicts against each other variant, one row per (variant, metric), one
    column per cell: "beats", "loses" (the 95% interval excludes zero) or "-" (no clear difference)."""
    cells = grid["cells"]
    others = others or [v for v in ALL_VARIANTS if v != a and any(v in c["variants"] for c in cells)]
    names = REAL_METRIC_NAMES if any(is_real(c) for c in cells) else METRIC_NAMES
    width = max(len(f"vs {LABELS[o]}: {names[m]}") for o in others for m in metrics) + 2
    lines = [f"{LABELS[a]} ...".ljust(width) + "".join(f"{cell_label(c):>17s}" for c in cells)]
    for o in others:
        for m in metrics:
            row = [SHORT_VERDICTS.get(cell_verdict(c, m, o, a), "n/a") for c in cells]
            lines.append(f"vs {LABELS[o]}: {names[m]}".ljust(width) + "".join(f"{v:>17s}" for v in row))
    return "\n".join(lines)


def grid_sentences(grid: dict, a: str = "zero_init") -> list[str]:
    """The grid in a few sentences, every number read from it: where each variant starts (the English
    text's loss at step 0), where it ends (held-out accuracy, text loss, general questions kept: the
    range of the cells' means) and in how many cells zero-init's paired verdict is a win or a loss."""
    cells = grid["cells"]
    others = [v for v in ALL_VARIANTS if v != a and any(v in c["variants"] for c in cells)]
    seeds = sorted({row["seeds"] for c in cells for row in c["variants"].values()})

    def span(v: str, metric: str, digits: int) -> str:
        means = [c["variants"][v][metric]["mean"] for c in cells if v in c["variants"]]
        lo, hi = f"{min(means):.{digits}f}", f"{max(means):.{digits}f}"
        return lo if lo == hi else f"{lo} to {hi}"

    base = cells[0]["base_knowledge"]
    exact = all(c["variants"][a]["text_loss_step0"]["std"] == 0 and
                c["variants"][a]["text_loss_step0"]["mean"] == c["base_knowledge"]["corpus_loss"] for c in cells)
    lines = [f"{len(cells)} cells ({'; '.join(cell_label(c) for c in cells)}), {' or '.join(map(str, seeds))} seeds "
             f"per variant and cell; each range runs over the cells' means.",
             f"Step 0, the English text's loss: {LABELS[a]} {'exactly' if exact else 'not exactly'} the frozen base's "
             f"{base['corpus_loss']:.3f} in every run; " + "; ".join(
                 f"{LABELS[v]} {span(v, 'text_loss_step0', 2)}" for v in others) + "."]
    for metric, what in (("heldout_accuracy", "held-out accuracy"), ("text_loss_final", "the English text's loss"),
                         ("facts_kept", f"general questions still answered (the frozen base: {base['fact_accuracy']:.2f})")):
        lines.append(f"After training, {what}: " + "; ".join(f"{LABELS[v]} {span(v, metric, 2)}" for v in (a, *others))
                     + ".")
    for v in others:
        parts = []
        for metric in ("heldout_accuracy", "pretrain_loss_after", "facts_kept", "early_loss"):
            tally = grid_verdict(grid, metric, v, a)
            parts.append(f"{REAL_METRIC_NAMES[metric]} " + "/".join(
                str(len(tally.get(k, []))) for k in ("better", "worse", "no clear difference")))
        lines.append(f"{LABELS[a]} vs {LABELS[v]}, paired by seed (in how many of the {len(cells)} cells zero-init is "
                     f"better/worse/not clearly different): " + "; ".join(parts) + ".")
    return lines


def report_grid(grid: dict) -> str:
    """The grid in words: per cell its table (:func:`format_table`) and paired verdicts (:func:`sentence`)."""
    lines = []
    for cell in grid["cells"]:
        summary = {"variants": cell["variants"], "settings": cell["settings"], "base_knowledge": cell["base_knowledge"]}
        seeds = min(row["seeds"] for row in cell["variants"].values())
        lines += [f"== {cell_label(cell)} ({cell['name']}, {seeds} seeds, {cell['run_seconds'] / 60:.0f} min of runs)",
                  format_table(summary), ""]
        lines += [f"- {sentence(c, names=REAL_METRIC_NAMES if is_real(summary) else METRIC_NAMES)}"
                  for c in cell["comparisons"]]
        lines.append("")
    lines += ["zero-init's verdicts per cell (paired by seed; \"-\": the 95% interval includes zero):",
              verdict_matrix(grid), "", "in short:", *(f"- {line}" for line in grid_sentences(grid))]
    return "\n".join(lines)


def plot_grid(studies: dict[str, Sequence[dict]], path: Optional[str | os.PathLike] = None):
    """A grid of studies in one figure: top, the end of training per cell (held-out accuracy, the
    English text's loss at step 0 and after training, general questions kept; mean +- std, seeds as
    dots); bottom, per cell, the text loss during training (log scale: random gates start far up).
    studies: {cell label: runs}. Returns the figure (saved to ``path`` when given)."""
    plt = _pyplot(path)
    from matplotlib.ticker import ScalarFormatter
    import numpy as np

    real = all("text_loss_final" in r for runs in studies.values() for r in runs)
    names = REAL_METRIC_NAMES if real else METRIC_NAMES
    metrics = ("heldout_accuracy", "text_loss_step0", "text_loss_final", "facts_kept") if real else \
        ("heldout_accuracy", "knowledge_at_init", "pretrain_loss_after", "facts_kept")
    n = max(len(metrics), len(studies))
    fig, axes = plt.subplots(2, n, figsize=(4.6 * n, 7.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        _regime_bars(ax, studies, metric, names)
        ax.tick_params(axis="x", labelsize=8)
        if metric in ("text_loss_step0", "knowledge_at_init"):
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(ScalarFormatter())
            ax.tick_params(axis="y", which="both", labelsize=7)
    axes[0][0].set_ylim(0, 1)
    axes[0][0].legend(fontsize=7)
    for ax, (label, runs) in zip(axes[1], studies.items()):
        base = next((r["knowledge_before"]["corpus_loss"] for r in runs if r["variant"] == "zero_init"), None)
        for v in [v for v in ALL_VARIANTS if any(r["variant"] == v for r in runs)]:
            rows = [r for r in runs if r["variant"] == v and "knowledge_log" in r]
            if not rows:
                continue
            kept = np.array([[k["corpus_loss"] for k in r["knowledge_log"]] for r in rows])  # (seeds, records)
            steps = [k["step"] for k in rows[0]["knowledge_log"]]
            ax.plot(steps, kept.mean(0), color=COLORS[v], marker=".", label=LABELS[v])
            ax.fill_between(steps, kept.min(0), kept.max(0), color=COLORS[v], alpha=0.2)
        if base is not None:
            ax.axhline(base, color="k", ls="--", lw=1, label="frozen base")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(axis="y", which="both", labelsize=7)
        ax.set(xlabel="step", title=f"{label}: text loss during training", ylabel="loss (mean; band: seeds' range)")
        ax.yaxis.label.set_fontsize(8)
    axes[1][0].legend(fontsize=7)
    for row, used in zip(axes, (len(metrics), len(studies))):
        for ax in row[used:]:
            ax.set_visible(False)
    return _saved(fig, path, dpi=80)


__all__ = ["AblationConfig", "VARIANTS", "SCALED", "ALL_VARIANTS", "study_train", "study_adapter", "study_variants",
           "Bench", "tiny_world_bench", "make_bench", "real_bench", "study_bench", "knowledge", "evaluate",
           "attention_share", "attention_shares", "gate_record", "loss_spikes", "run_one", "run_ablation", "read_runs",
           "read_study", "summarize", "stats", "compare", "comparisons", "metric_names", "sentence", "format_table",
           "report", "seeds_warning", "plot_study", "plot_regimes", "fact_completion_accuracy", "variant_stats",
           "grid_cells", "collect_grid", "cell_label", "cell_verdict", "grid_verdict", "verdict_matrix", "grid_sentences", "report_grid",
           "plot_grid"]
