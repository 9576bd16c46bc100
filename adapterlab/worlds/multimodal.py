"""The multi-modal LLaMA-Adapter on the embedded scenes: the base, the image token, training, the demo.

Glue on top of the scenes (:mod:`adapterlab.worlds.scenes`, the pictures;
:mod:`adapterlab.worlds.scenetext`, what is asked and told about them), the adapter and its visual
projection, the training loop, greedy generation and the frozen scene encoder (:mod:`adapterlab.worlds.vision`).

The frozen base is a small LLaMA pretrained by :func:`pretrain_scene_base` on text about the
scenes (descriptions, reading exercises, quizzes with a text context, facts): the "LLaMA that
already reads", to which the adapter must bring the pictures. The tiny-world base
(:mod:`adapterlab.worlds.tinyworld`) has never read about shapes, colours of shapes or corners. The
package ships the default config's base (``adapterlab/bases/scenes-<hash>``, docs/bases.md); a
changed config builds its own into the cache, with one CPU thread (:func:`build_scene_base`).

The multi-modal forward (Sec. 3.3; docs/method.md, "Multi-modal adapter"):

    feats = encoder(images)               # frozen, computed once for every picture  (N, visual_dim)
    I_p   = model.visual_proj(feats)       # learnable projection                   (B, C)
    logits = model(tokens, visual=I_p)     # P_l + Repeat(I_p) in every adapted layer

An example without a picture gets no image token (I_p = 0: the prompts stay P_l).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..adapter import AdapterConfig, add_adapter, count_trainable
from ..io.weights import read_llama, save_llama
from ..data import IGNORE_INDEX, TokenDataset, text_windows
from ..io.files import BUILD_THREADS, base_folder, build_machine, cache_root, cpu_threads, shipped_base
from ..gates import GateRecorder, pyplot
from ..generate import generate_tokens
from ..model import Llama, LlamaConfig, init_weights
from .scenes import Scene, make_scenes
from .scenetext import (
    KINDS, Example, Fact, caption_example, knowledge_facts, knowledge_question, parse_answer, pretrain_corpus,
    scene_answer, scene_question, score,
)
from ..tokenizer import Tokenizer
from ..train import TrainConfig, train, write_metrics
from .vision import encode_images, pretrain_scene_encoder


# --------------------------------------------------------------------------- the data of a run
def demo_train() -> TrainConfig:
    """The adapters' training budget in the demo (the multi-modal and the text-only adapter get the same).
    warmup_steps None: a tenth of the steps (at least 1)."""
    return TrainConfig(steps=600, batch_size=32, lr=3e-2, weight_decay=0.02, checkpoint=False, log_every=10)


def demo_adapter() -> AdapterConfig:
    """K prompts in the top L layers of the scene base (the multi-modal run adds the encoder's visual_dim)."""
    return AdapterConfig(prompt_len=10, layers=4)


@dataclass
class MultimodalConfig:
    """Everything that decides a multi-modal run (defaults: the demo, about 3 minutes on 2 CPU cores).

    train: the adapters' budget (steps, batch_size, lr, ...; warmup_steps None: a tenth of the steps);
        the run sets its seed (``seed``), output folder, progress bar and checkpointing (none).
    adapter: prompt_len and layers of both adapters; visual_dim is the run's (the encoder's width for
        the multi-modal adapter, None for the text-only one).
    """

    seed: int = 0
    train_scenes: int = 3000  # pictures for the encoder, the pretraining text and the adapter
    test_scenes: int = 150  # new pictures for evaluation (every question kind on each)
    # the base LLaMA, pretrained on text about scenes
    vocab_size: int = 320
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    pretrain_steps: int = 1000
    pretrain_batch_size: int = 16
    pretrain_seq_len: int = 128
    pretrain_lr: float = 6e-3
    # the visual encoder, pretrained on the scenes' attributes, then frozen
    encoder_steps: int = 400
    # the adapter (the multi-modal one and the text-only one get the same budget)
    train: TrainConfig = field(default_factory=demo_train)
    adapter: AdapterConfig = field(default_factory=demo_adapter)
    image_questions: int = 3000
    text_questions: int = 1000
    caption_examples: int = 1500
    max_new_tokens: int = 24

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):  # as to_dict() wrote it (metrics.json, scenes.json)
            self.train = TrainConfig(**self.train)
        if isinstance(self.adapter, dict):
            self.adapter = AdapterConfig(**self.adapter)
        if not isinstance(self.train, TrainConfig) or self.train.steps is None:
            raise ValueError(f"MultimodalConfig.train must be a TrainConfig with steps set; got {self.train!r}")
        if not isinstance(self.adapter, AdapterConfig):
            raise ValueError(f"MultimodalConfig.adapter must be an AdapterConfig; got {self.adapter!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SceneData:
    """Pictures, texts and examples of one run (deterministic for the config's seed)."""

    train_scenes: list[Scene]
    train_images: torch.Tensor  # uint8 (N, 3, H, W)
    test_scenes: list[Scene]
    test_images: torch.Tensor
    train_facts: list[Fact]
    test_facts: list[Fact]
    corpus: list[str]  # pretraining documents of the base
    train: list[Example]  # adapter training (image indices into train_images)
    test: list[Example]  # evaluation (image indices into test_images)


def make_data(config: MultimodalConfig) -> SceneData:
    """Render the pictures and write every text of a run."""
    rng = np.random.default_rng(config.seed)
    train_scenes, train_images = make_scenes(config.train_scenes, seed=config.seed * 2 + 1)
    test_scenes, test_images = make_scenes(config.test_scenes, seed=config.seed * 2 + 2)
    facts = knowledge_facts()
    order = rng.permutation(len(facts))
    train_facts = [facts[i] for i in sorted(order[: len(facts) // 2])]
    test_facts = [facts[i] for i in sorted(order[len(facts) // 2 :])]
    corpus = pretrain_corpus(train_scenes, facts, rng)

    train: list[Example] = []
    for i in rng.integers(len(train_scenes), size=config.image_questions):
        train.append(scene_question(train_scenes[i], KINDS[rng.integers(len(KINDS))], rng, "image", int(i)))
    for i in rng.integers(len(train_scenes), size=config.text_questions):
        train.append(scene_question(train_scenes[i], KINDS[rng.integers(len(KINDS))], rng, "text", None))
    train += [knowledge_question(f) for f in train_facts] * 8
    for i in rng.integers(len(train_scenes), size=config.caption_examples):
        train.append(caption_example(train_scenes[i], int(i), rng))

    test: list[Example] = []
    for i, scene in enumerate(test_scenes):
        test += [scene_question(scene, kind, rng, "image", i) for kind in KINDS]
        test.append(scene_question(scene, KINDS[i % len(KINDS)], rng, "text", None))
        test.append(caption_example(scene, i, rng))
    test += [knowledge_question(f) for f in test_facts]
    return SceneData(train_scenes, train_images, test_scenes, test_images, train_facts, test_facts, corpus, train, test)



# --------------------------------------------------------------------------- the base LLaMA
PREFIX_STEPS = 16  # scenes.json keeps the loss of each of the first steps: a quick check that a rebuild matches


def pretrain_scene_base(corpus: Sequence[str], config: MultimodalConfig, progress: bool = True,
                        stop_after: Optional[int] = None):
    """Train a SentencePiece tokenizer and pretrain a small LLaMA on the scene corpus.

    Uses the project's one training loop (:func:`adapterlab.train.train`) on windows of the
    token stream BOS doc EOS BOS doc EOS ... with torch's current thread count (the cached and
    shipped bases: ``files.BUILD_THREADS``, see :func:`build_scene_base`). Returns (model,
    tokenizer, metrics); the model is frozen (requires_grad False) and in eval mode.
    metrics["first_losses"]: the loss of each of the first PREFIX_STEPS steps. stop_after=n:
    end after n steps (n <= PREFIX_STEPS; the schedule stays the full run's) and return
    (None, tokenizer, {"first_losses": ...}): a quick check of a rebuild.
    """
    tokenizer = Tokenizer.train(corpus, vocab_size=config.vocab_size)
    stream: list[int] = []
    for doc in corpus:
        stream += tokenizer.encode(doc, bos=True, eos=True)
    data = text_windows(stream, config.pretrain_seq_len, source="scene corpus")
    torch.manual_seed(config.seed)
    llama_config = LlamaConfig(dim=config.dim, n_layers=config.n_layers, n_heads=config.n_heads,
                               vocab_size=tokenizer.n_words, multiple_of=32, max_seq_len=256)
    model = init_weights(Llama(llama_config), seed=config.seed)
    tc = TrainConfig(steps=config.pretrain_steps, batch_size=config.pretrain_batch_size, lr=config.pretrain_lr,
                     warmup_steps=max(1, config.pretrain_steps // 15), weight_decay=0.02, clip=1.0,
                     seed=config.seed, checkpoint=False, progress=progress,
                     desc="pretrain the base on scene text", log_every=25)
    first: list[float] = []

    def keep_first(step: int, info: dict) -> None:
        if step <= PREFIX_STEPS:
            first.append(info["loss"])
        if stop_after is not None and step >= stop_after:
            raise _EnoughSteps

    try:
        metrics = train(model, data, tc, callbacks=[keep_first])
    except _EnoughSteps:
        return None, tokenizer, {"first_losses": first}
    metrics["corpus_tokens"] = len(stream)
    metrics["first_losses"] = first
    model.requires_grad_(False).eval()
    return model, tokenizer, metrics


class _EnoughSteps(Exception):
    """Ends a pretraining run early (pretrain_scene_base(stop_after=n))."""


BASE_VERSION = 3  # bump when the corpus, the pretraining code or the folder's files change what gets built
# (3: built with files.BUILD_THREADS threads - older folders were built with the machine's - and safetensors)
BASE_FIELDS = ("seed", "train_scenes", "vocab_size", "dim", "n_layers", "n_heads", "pretrain_steps",
               "pretrain_batch_size", "pretrain_seq_len", "pretrain_lr")
BASE_INFO = "scenes.json"  # beside the Meta files: how the base was made (losses, steps, config, machine)


def scene_base_name(config: MultimodalConfig, corpus: Sequence[str]) -> str:
    """The base's folder name, ``scenes-<hash of the base settings and corpus>``: the same in the
    package (``adapterlab/bases/``) and in the cache."""
    blob = json.dumps({"config": {k: getattr(config, k) for k in BASE_FIELDS}, "version": BASE_VERSION,
                       "corpus": hashlib.sha256("\n".join(corpus).encode()).hexdigest()}, sort_keys=True)
    return f"scenes-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def scene_base_dir(config: MultimodalConfig, corpus: Sequence[str]) -> Path:
    """The cache folder of a config's base: ``<cache>/scenes-<hash>`` (there or not)."""
    return cache_root() / scene_base_name(config, corpus)


def build_scene_base(corpus: Sequence[str], config: MultimodalConfig, progress: bool = True,
                     force: bool = False) -> Path:
    """Make sure the config's base exists; return its folder: the shipped one, else the cache
    folder, built there on first use under a lock (concurrent callers wait for one build, and
    the folder appears whole or not at all). force=True: build it anew into the cache (the
    shipped copy is left alone). A build uses ``files.BUILD_THREADS`` (1) threads, so it gives
    the same bytes on every machine of a CPU kind.

    The folder: params.json, consolidated.00.safetensors, tokenizer.model (a Meta-style folder,
    :func:`adapterlab.io.weights.save_llama`) and scenes.json (how it was made)."""
    name = scene_base_name(config, corpus)

    def build(folder: Path) -> None:
        t0 = time.perf_counter()
        model, tokenizer, metrics = pretrain_scene_base(corpus, config, progress)
        info = {"final_loss": metrics["final_loss"], "steps": metrics["steps"], "config": config.to_dict(),
                "version": BASE_VERSION, "key": name, "loss_history": metrics["loss_history"],
                "first_losses": metrics["first_losses"], "pretrain_seconds": round(time.perf_counter() - t0, 1),
                "built_with": build_machine()}
        save_llama(model, tokenizer, folder, extra={BASE_INFO: info}, weights="safetensors")

    return base_folder(name, "params.json", build, force=force)


def load_scene_base(corpus: Sequence[str], config: MultimodalConfig, progress: bool = True, cache: bool = True):
    """The pretrained base for a config: the shipped one (``adapterlab/bases/scenes-<hash>``), else
    the cache folder, else pretrained now at ``files.BUILD_THREADS`` threads (with cache=True
    published to the cache; concurrent callers wait for one build). Returns (model, tokenizer,
    info) with info["cached"] False when it was pretrained now, and info["shipped"].

    The folder is a one-shard Meta folder (:func:`adapterlab.io.weights.save_llama`) plus
    ``scenes.json``, so ``load_llama(folder)`` reads it like any other LLaMA."""
    shipped = shipped_base(scene_base_name(config, corpus))
    if not cache and shipped is None:
        with cpu_threads(BUILD_THREADS):
            model, tokenizer, metrics = pretrain_scene_base(corpus, config, progress)
        return model, tokenizer, {"cached": False, "shipped": False, "final_loss": metrics["final_loss"],
                                  "steps": metrics["steps"]}
    already = shipped is not None or (scene_base_dir(config, corpus) / "params.json").is_file()
    folder = build_scene_base(corpus, config, progress)
    model = read_llama(folder, device="cpu").requires_grad_(False)
    info = json.loads((folder / BASE_INFO).read_text())
    return model, model.tokenizer, {"cached": already, "shipped": shipped is not None,
                                    "final_loss": info["final_loss"], "steps": info["steps"], "folder": str(folder)}


# --------------------------------------------------------------------------- images into the model
def image_inputs(features: Optional[torch.Tensor], image_ids: Sequence[Optional[int]]) -> dict[str, torch.Tensor]:
    """The model's picture inputs for examples showing pictures ``image_ids`` (None: no picture).

    features: (N, visual_dim) frozen encoder features of all pictures, or None (a text-only
    model: returns {}). Returns {"image_features": (B, visual_dim), "has_image": (B,) bool},
    the keywords ``model(tokens, image_features=..., has_image=...)`` turns into the image token
    I_p = visual_proj(features) (0 where has_image is False).
    """
    if features is None:
        return {}
    ids = torch.tensor([-1 if i is None else i for i in image_ids], dtype=torch.long)  # (B,)
    return {"image_features": features[ids.clamp(min=0)], "has_image": ids >= 0}


def example_dataset(tokenizer, examples: Sequence[Example], max_seq_len: int,
                    features: Optional[torch.Tensor] = None) -> TokenDataset:
    """Examples -> a TokenDataset: BOS prompt response EOS, loss on the response only, and (with
    ``features``) each example's picture inputs as per-example model inputs (:func:`image_inputs`)."""
    tokens, labels = [], []
    for ex in examples:
        prompt = tokenizer.encode(ex.prompt, bos=True, eos=False)
        response = tokenizer.encode(ex.response, bos=False, eos=True)
        if len(prompt) + len(response) > max_seq_len:
            raise ValueError(f"example {ex.prompt!r:.60} has {len(prompt) + len(response)} tokens, more than "
                             f"max_seq_len={max_seq_len}")
        tokens.append(prompt + response)
        labels.append([IGNORE_INDEX] * len(prompt) + response)
    return TokenDataset(tokens, labels, source="scene examples",
                        forward_args=image_inputs(features, [ex.image for ex in examples]))


def train_adapter(model: Llama, tokenizer, examples: Sequence[Example], features: Optional[torch.Tensor],
                  config: MultimodalConfig, out_dir: Optional[str | Path], progress: bool = True,
                  desc: str = "adapter") -> dict:
    """Tune the adapter of ``model`` (already attached) on the examples with the project's loop.

    features: the frozen encoder features of the pictures the examples show (multi-modal
    adapter), or None (text-only adapter: the examples' pictures are left out)."""
    data = example_dataset(tokenizer, examples, model.config.max_seq_len, features)
    t = config.train
    tc = replace(t, warmup_steps=max(1, t.steps // 10) if t.warmup_steps is None else t.warmup_steps,
                 seed=config.seed, out_dir=str(out_dir) if out_dir is not None else None, checkpoint=False,
                 progress=progress, desc=desc)
    recorder = [GateRecorder(out_dir, every=tc.log_every)] if out_dir is not None else []  # gates.jsonl, gates.png
    return train(model, data, tc, callbacks=recorder)


# --------------------------------------------------------------------------- answering
@torch.no_grad()
def answer(model: Llama, tokenizer, examples: Sequence[Example], features: Optional[torch.Tensor],
           max_new_tokens: int = 24, batch_size: int = 128) -> list[str]:
    """Greedy answers (the paper decodes greedily) to the examples' prompts, with their pictures.

    Prompts of similar length are batched together (the generation loop feeds a batch's prompts
    from its shortest one on, one position per step), and the answers come back in the examples' order."""
    prompts = [tokenizer.encode(ex.prompt, bos=True, eos=False) for ex in examples]
    order = sorted(range(len(examples)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(examples)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        inputs = image_inputs(features, [examples[i].image for i in chunk])
        visual = model.image_token(**{k: v.to(model.device) for k, v in inputs.items()}) if inputs else None  # (B, dim)
        new = generate_tokens(model, [prompts[i] for i in chunk], max_new_tokens=max_new_tokens, greedy=True,
                              visual=visual, eos_id=tokenizer.eos_id)
        for i, t in zip(chunk, new):
            outputs[i] = tokenizer.decode(t).strip()
    return outputs


# --------------------------------------------------------------------------- pictures of the results
def save_prediction_grid(path: str | Path, images: torch.Tensor, rows: Sequence[dict], columns: int = 4) -> Path:
    """One PNG with each picture above its question, both models' answers and the caption.

    rows: dicts with "image" (index into images), "question", "truth" (letter), "truth_text",
    "multimodal", "text_only", "caption" (strings).
    """
    plt = pyplot()
    n = len(rows)
    n_rows = max(1, math.ceil(n / columns))
    fig, axes = plt.subplots(n_rows, columns, figsize=(4.2 * columns, 5.0 * n_rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows):
        ax.imshow(images[row["image"]].permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(row["question"], fontsize=9, wrap=True)
        mark = lambda out: "right" if parse_answer(out) == row["truth"] else "wrong"  # noqa: E731
        text = (f"truth: ({row['truth']}) {row.get('truth_text', '')}\n"
                f"with the image ({mark(row['multimodal'])}):\n  {row['multimodal']}\n"
                f"text-only ({mark(row['text_only'])}):\n  {row['text_only']}\n"
                f"caption: {row['caption']}")
        ax.text(0.0, -0.04, text, transform=ax.transAxes, va="top", ha="left", fontsize=8, family="monospace",
                wrap=True)
    fig.suptitle("Multi-modal LLaMA-Adapter on held-out pictures: greedy answers with and without the image",
                 fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _short_question(prompt: str) -> str:
    return prompt.split("\n")[0].removeprefix("Question: ")


# --------------------------------------------------------------------------- the demo
def run_multimodal_demo(out_dir: str | Path = "runs/multimodal", config: Optional[MultimodalConfig] = None,
                        progress: bool = True, verbose: bool = True, n_samples: int = 8, cache: bool = True) -> dict:
    """The whole multi-modal story on the embedded scenes; returns the metrics written to metrics.json.

    1. render the pictures, write the texts; 2. pretrain the base LLaMA on scene text;
    3. pretrain the visual encoder on the pictures, freeze it; 4. tune a multi-modal adapter
    (prompts + gates + projection) and a text-only adapter with the same budget; 5. answer the
    held-out questions greedily and caption the held-out pictures; 6. write metrics.json,
    gates.jsonl / gates.png (multi-modal run; text_only/ holds the text-only run's),
    samples.png (pictures with both models' answers) and samples.json.

    cache: keep the pretrained base in the user cache (``$ADAPTERLAB_CACHE`` or
    ~/.cache/adapterlab, as the tiny-world base) and reuse it next time.
    """
    config = config or MultimodalConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = print if verbose else (lambda *a, **k: None)
    t0 = time.perf_counter()
    timings = {}

    say("== 1. Pictures and texts: rendered scenes of shapes (shape, colour, count, corner)")
    data = make_data(config)
    timings["data_seconds"] = round(time.perf_counter() - t0, 2)
    say(f"   {len(data.train_scenes)} training pictures, {len(data.test_scenes)} held-out pictures, "
        f"{len(data.corpus)} pretraining texts, {len(data.train)} adapter examples, {len(data.test)} test items")

    say("== 2. The frozen base: a small LLaMA pretrained on text about scenes (it never sees a picture)")
    t = time.perf_counter()
    base, tokenizer, pre_metrics = load_scene_base(data.corpus, config, progress, cache)
    timings["pretrain_seconds"] = round(time.perf_counter() - t, 2)
    how = f"loaded from {pre_metrics['folder']}" if pre_metrics["cached"] else "pretrained now"
    say(f"   {base.num_params():,} parameters, loss {pre_metrics['final_loss']:.3f} after "
        f"{pre_metrics['steps']} steps ({how}, {timings['pretrain_seconds']:.0f} s)")

    say("== 3. The frozen visual encoder: a small CNN pretrained on the pictures' attributes")
    t = time.perf_counter()
    encoder, enc_info = pretrain_scene_encoder(data.train_images, data.train_scenes, steps=config.encoder_steps,
                                               seed=config.seed, progress=progress)
    train_feats = encode_images(encoder, data.train_images)
    test_feats = encode_images(encoder, data.test_images)
    timings["encoder_seconds"] = round(time.perf_counter() - t, 2)
    say(f"   visual_dim {encoder.visual_dim}; attribute accuracy on pictures it did not train on: "
        + ", ".join(f"{k} {v:.2f}" for k, v in enc_info["heldout_accuracy"].items()))

    results = {}
    for name in ("multimodal", "text_only"):
        multimodal = name == "multimodal"
        say(f"== 4{'a' if multimodal else 'b'}. {'Multi-modal' if multimodal else 'Text-only'} adapter"
            + (" (image token added to the prompts)" if multimodal else " (same data and budget, no picture)"))
        model = copy.deepcopy(base)
        add_adapter(model, replace(config.adapter, visual_dim=encoder.visual_dim if multimodal else None),
                    seed=config.seed)
        feats_train, feats_test = (train_feats, test_feats) if multimodal else (None, None)
        t = time.perf_counter()
        m = train_adapter(model, tokenizer, data.train, feats_train, config, out if multimodal else out / "text_only",
                          progress, desc=f"{name} adapter")
        model.eval()
        outputs = answer(model, tokenizer, data.test, feats_test, config.max_new_tokens)
        scores = score(data.test, outputs)
        scores.update(trainable_params=count_trainable(model), train_seconds=m["train_seconds"],
                      final_loss=m["final_loss"], seconds=round(time.perf_counter() - t, 2))
        if multimodal:
            scores["projection_params"] = sum(p.numel() for p in model.visual_proj.parameters())
        results[name] = (scores, outputs)
        say(f"   accuracy {scores['accuracy']:.3f}: " + ", ".join(
            f"{c} {v:.3f}" for c, v in scores["accuracy_by_context"].items()) + f"; caption BLEU-4 {scores['bleu4']:.3f}")

    mm, mm_out = results["multimodal"]
    to, to_out = results["text_only"]
    samples = []
    caption_of = {ex.image: out for ex, out in zip(data.test, mm_out) if ex.context == "caption"}
    picked = {(ex.image, ex.kind): i for i, ex in enumerate(data.test) if ex.context == "image"}
    n_pictures = len(data.test_scenes)
    for j in range(min(n_samples, n_pictures)):  # different pictures, every question kind in turn
        i = picked[(j * n_pictures // n_samples, KINDS[j % len(KINDS)])]
        ex = data.test[i]
        samples.append({"image": ex.image, "question": _short_question(ex.prompt), "truth": ex.answer,
                        "truth_text": scene_answer(data.test_scenes[ex.image], ex.kind)[0],
                        "scene": data.test_scenes[ex.image].to_dict(), "multimodal": mm_out[i],
                        "text_only": to_out[i], "caption": caption_of.get(ex.image, "")})
    save_prediction_grid(out / "samples.png", data.test_images, samples)
    (out / "samples.json").write_text(json.dumps(samples, indent=2) + "\n")

    metrics = {
        "accuracy": mm["accuracy"],
        "accuracy_by_context": mm["accuracy_by_context"],
        "image_accuracy_by_kind": mm["image_accuracy_by_kind"],
        "text_only_accuracy": to["accuracy"],
        "text_only_accuracy_by_context": to["accuracy_by_context"],
        "text_only_image_accuracy_by_kind": to["image_accuracy_by_kind"],
        "image_gain_points": 100 * (mm["accuracy_by_context"]["image"] - to["accuracy_by_context"]["image"]),
        "captions": {"bleu4": mm["bleu4"], "text_only_bleu4": to["bleu4"], "bleu": mm["bleu"],
                     "text_only_bleu": to["bleu"], "references_per_picture": 5},
        "test_counts": mm["counts"],
        "base_params": base.num_params(),
        "trainable_params": mm["trainable_params"],
        "projection_params": mm["projection_params"],
        "text_only_trainable_params": to["trainable_params"],
        "encoder": {"visual_dim": encoder.visual_dim, "params": sum(p.numel() for p in encoder.parameters()),
                    **enc_info},
        "pretrain_final_loss": pre_metrics["final_loss"],
        "base_from_cache": pre_metrics["cached"],
        "adapter_final_loss": mm["final_loss"],
        "text_only_final_loss": to["final_loss"],
        **timings,
        "multimodal_seconds": mm["seconds"],
        "text_only_seconds": to["seconds"],
        "demo_seconds": round(time.perf_counter() - t0, 2),
        "samples": samples,
        "multimodal_config": config.to_dict(),
    }
    write_metrics(out, metrics)
    say(f"== 5. Image questions: {mm['accuracy_by_context']['image']:.3f} with the image vs "
        f"{to['accuracy_by_context']['image']:.3f} text-only; text context {mm['accuracy_by_context']['text']:.3f} vs "
        f"{to['accuracy_by_context']['text']:.3f}; captions BLEU-4 {mm['bleu4']:.3f} vs {to['bleu4']:.3f}")
    say(f"   wrote {out}/metrics.json, gates.jsonl, gates.png, samples.png, samples.json "
        f"({metrics['demo_seconds']:.0f} s in all)")
    return metrics
