"""The multi-modal LLaMA-Adapter (Sec. 3.3) on the embedded scenes: tasks, BLEU-4, training, demo.

Tasks, in the style of ScienceQA (multiple choice, three context categories) and COCO (captions):

    Question: What colour are the shapes in the picture?
    Context: N/A
    Options: (A) red (B) green (C) blue (D) yellow
    Answer: The colour is blue. The answer is (C).

- context "image": the answer is in the picture only (the text context is "N/A");
- context "text":  the answer is in the text context (a description of a scene, no picture);
- context "none":  general knowledge that the base model read in pretraining (colours of
  things, corners of shapes, small sums); tested on facts the adapter never trained on.
- captions: "Caption the picture." -> "three red circles in the top left corner", scored with
  corpus BLEU-4 against five reference captions per picture, as COCO does.

The response is a one-sentence solution, then the answer - ScienceQA's chain-of-thought
format (solution, then "The answer is (X)."), answered by greedy decoding as in the paper.

One simplification keeps a tiny base able to do this after about a minute of pretraining:
each attribute has exactly four values and the options list them in a fixed order, so the
letter is a lookup of the solution's word. With shuffled options the letter needs in-context
matching ("which option says blue?"), which a ~1M-parameter base had not learned after
3,000 pretraining steps (accuracy still at chance, measured while building this module).

The frozen base is a small LLaMA pretrained by :func:`pretrain_scene_base` on text about the
scenes (descriptions, reading exercises, quizzes with a text context, facts): the "LLaMA that
already reads", to which the adapter must bring the pictures. The tiny-world base
(:mod:`adapterlab.tinyworld`) has never read about shapes, colours of shapes or corners.

The multi-modal forward (Sec. 3.3):

    feats = encoder(images)               # frozen, computed once for every picture  (N, visual_dim)
    I_p   = model.visual_proj(feats)       # learnable projection                   (B, C)
    logits = model(tokens, visual=I_p)     # P_l + Repeat(I_p) in every adapted layer

An example without a picture gets no image token (I_p = 0: the prompts stay P_l).
"""
from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .scenes import COLOURS, CORNERS, COUNTS, NUMBER_WORDS, PLURAL, SHAPES, Scene, make_scenes

LETTERS = "ABCD"
CONTEXTS = ("image", "text", "none")
ANSWER_RE = re.compile(r"answer is \(([A-D])\)")
NONE_CONTEXT = "N/A"


@dataclass
class Example:
    """One training or evaluation record.

    prompt/response: what the model reads and what it must write. context: "image", "text",
    "none" or "caption". image: index of the picture in the image tensor (None: no picture).
    answer: the correct letter (multiple choice). kind: the question's kind ("colour", ...,
    "knowledge", "caption"). references: the reference captions (captions only).
    """

    prompt: str
    response: str
    context: str
    image: Optional[int] = None
    answer: Optional[str] = None
    kind: str = ""
    references: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- words about scenes
def there_is(scene: Scene) -> str:
    return "there is" if scene.count == 1 else "there are"


def captions(scene: Scene) -> list[str]:
    """Five COCO-style reference captions of one scene (lower case, no final full stop)."""
    np_, corner = scene.noun_phrase(), scene.corner
    return [
        f"{np_} in the {corner} corner",
        f"{np_} in the {corner} of the picture",
        f"{there_is(scene)} {np_} in the {corner}",
        f"a picture of {np_} at the {corner}",
        f"{np_} sitting in the {corner} corner of the image",
    ]


def describe(scene: Scene, rng: np.random.Generator) -> str:
    """A sentence stating everything a picture shows (a text context, or pretraining text)."""
    np_, corner = scene.noun_phrase(), scene.corner
    they = "They are" if scene.count > 1 else "It is"
    templates = [
        f"The picture shows {np_} in the {corner} corner.",
        f"In the picture {there_is(scene)} {np_}. {they} in the {corner} corner.",
        f"A drawing of {np_} in the {corner} corner.",
    ]
    return templates[rng.integers(len(templates))]


IMAGE_QUESTIONS = {
    "colour": ("What colour are the shapes in the picture?", "Which colour do the shapes have?"),
    "shape": ("Which shape is in the picture?", "What shape are the objects?"),
    "count": ("How many shapes are in the picture?", "How many objects can you see?"),
    "corner": ("Where are the shapes in the picture?", "In which corner are the shapes?"),
}
KINDS = tuple(IMAGE_QUESTIONS)
OPTIONS = {  # the fixed option lists: every attribute has exactly four values
    "colour": COLOURS,
    "shape": SHAPES,
    "count": tuple(NUMBER_WORDS[c] for c in COUNTS),
    "corner": CORNERS,
}


def scene_answer(scene: Scene, kind: str) -> tuple[str, str]:
    """(the answer word, the solution sentence) of one question kind about one scene."""
    if kind == "colour":
        return scene.colour, f"The colour is {scene.colour}."
    if kind == "shape":
        return scene.shape, f"The shape is a {scene.shape}."
    if kind == "count":
        word = NUMBER_WORDS[scene.count]
        return word, f"The number of shapes is {word}."
    if kind == "corner":
        return scene.corner, f"The shapes are in the {scene.corner} corner."
    raise ValueError(f"unknown question kind {kind!r}; expected one of {KINDS}")


# --------------------------------------------------------------------------- general knowledge ("none")
@dataclass(frozen=True)
class Fact:
    question: str
    answer: str
    options: tuple[str, ...]
    solution: str  # also the sentence the base reads in pretraining


def knowledge_facts() -> list[Fact]:
    """The general-knowledge facts behind the no-context questions (each with 4 fixed options)."""
    facts = []
    things = {
        "the sky on a sunny day": "blue", "grass": "green", "a banana": "yellow", "a tomato": "red",
        "a lemon": "yellow", "a strawberry": "red", "a leaf in summer": "green", "the sea": "blue",
        "a fire engine": "red", "a frog": "green", "a blueberry": "blue", "the sun in a drawing": "yellow",
    }
    for thing, colour in things.items():
        facts.append(Fact(f"What colour is {thing}?", colour, COLOURS, f"{thing[0].upper() + thing[1:]} is {colour}."))
    corners = {"circle": "zero", "triangle": "three", "square": "four", "cross": "twelve"}
    for shape, n in corners.items():
        facts.append(Fact(f"How many corners does a {shape} have?", n, tuple(corners.values()),
                          f"A {shape} has {n} corners."))
    shaped = {"a wheel": "circle", "a coin": "circle", "a slice of pizza": "triangle", "a plus sign": "cross",
              "a chess board": "square", "a window pane": "square", "a tent seen from the front": "triangle",
              "a hospital sign": "cross"}
    for thing, shape in shaped.items():
        facts.append(Fact(f"What shape is {thing}?", shape, SHAPES, f"{thing[0].upper() + thing[1:]} is shaped like a {shape}."))
    words = ("zero", "one", "two", "three", "four", "five")
    for a in range(1, 5):
        for b in range(1, 5):
            if a + b <= 5:
                facts.append(Fact(f"What is {words[a]} plus {words[b]}?", words[a + b], words[2:6],
                                  f"{words[a].capitalize()} plus {words[b]} is {words[a + b]}."))
    return facts


# --------------------------------------------------------------------------- prompts
def mc_prompt(question: str, context: str, options: Sequence[str]) -> str:
    """ScienceQA-style prompt: Question / Context / Options (A)...(D) / Answer:"""
    opts = " ".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))
    return f"Question: {question}\nContext: {context}\nOptions: {opts}\nAnswer:"


def mc_response(solution: str, letter: str) -> str:
    return f" {solution} The answer is ({letter})."


CAPTION_PROMPT = "Caption the picture.\nCaption:"


def parse_answer(text: str) -> Optional[str]:
    """The letter in '... The answer is (X).' or None when the text gives no such answer."""
    m = ANSWER_RE.search(text)
    return m.group(1) if m else None


def scene_question(scene: Scene, kind: str, rng: np.random.Generator, context: str, image: Optional[int]) -> Example:
    """A question about one scene, seen in a picture (context "image") or described in text ("text")."""
    answer, solution = scene_answer(scene, kind)
    options = OPTIONS[kind]
    letter = LETTERS[options.index(answer)]
    question = IMAGE_QUESTIONS[kind][rng.integers(len(IMAGE_QUESTIONS[kind]))]
    text = NONE_CONTEXT if context == "image" else describe(scene, rng)
    return Example(mc_prompt(question, text, options), mc_response(solution, letter), context, image, letter, kind)


def knowledge_question(fact: Fact) -> Example:
    letter = LETTERS[fact.options.index(fact.answer)]
    return Example(mc_prompt(fact.question, NONE_CONTEXT, fact.options), mc_response(fact.solution, letter),
                   "none", None, letter, "knowledge")


def caption_example(scene: Scene, image: int, rng: np.random.Generator) -> Example:
    refs = captions(scene)
    return Example(CAPTION_PROMPT, " " + refs[rng.integers(len(refs))] + ".", "caption", image, None, "caption", refs)


# --------------------------------------------------------------------------- BLEU-4
def caption_tokens(text: str) -> list[str]:
    """COCO-style tokenisation for scoring: lower case, punctuation dropped, split on spaces."""
    return re.sub(r"[^a-z0-9 ]", " ", text.lower()).split()


def ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def corpus_bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> dict:
    """Corpus BLEU (Papineni et al., 2002), the standard definition used for COCO captions.

    p_n = sum over sentences of clipped n-gram matches / sum of candidate n-grams, where a
    candidate n-gram's count is clipped to its largest count in any one reference.
    BP = 1 if c > r else exp(1 - r / c), c = total candidate length, r = sum over sentences of
    the reference length closest to the candidate's (ties: the shorter one).
    BLEU = BP * exp(mean_n log p_n); 0 when some p_n is 0 (no smoothing).
    Returns {"bleu": .., "precisions": [p_1..p_N], "brevity_penalty": .., "c": .., "r": ..}.
    """
    if len(candidates) != len(references):
        raise ValueError(f"corpus_bleu: {len(candidates)} candidates but {len(references)} reference lists")
    matches, totals = [0] * max_n, [0] * max_n
    c = r = 0
    for cand, refs in zip(candidates, references):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"corpus_bleu: candidate {cand!r} needs a list of reference captions; got {refs!r}")
        cw = caption_tokens(cand)
        rws = [caption_tokens(ref) for ref in refs]
        c += len(cw)
        r += min((abs(len(rw) - len(cw)), len(rw)) for rw in rws)[1]  # closest length, shorter on ties
        for n in range(1, max_n + 1):
            counts = ngrams(cw, n)
            max_ref = Counter()
            for rw in rws:
                max_ref |= ngrams(rw, n)  # element-wise max over the references
            matches[n - 1] += sum(min(k, max_ref[g]) for g, k in counts.items())
            totals[n - 1] += max(len(cw) - n + 1, 0)
    precisions = [m / t if t else 0.0 for m, t in zip(matches, totals)]
    bp = 1.0 if c > r else (math.exp(1 - r / c) if c else 0.0)
    bleu = bp * math.exp(sum(math.log(p) for p in precisions) / max_n) if min(precisions) > 0 else 0.0
    return {"bleu": bleu, "precisions": precisions, "brevity_penalty": bp, "c": c, "r": r}


# --------------------------------------------------------------------------- the data of a run
@dataclass
class MultimodalConfig:
    """Everything that decides a multi-modal run (defaults: the demo, about 3 minutes on 2 CPU cores)."""

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
    prompt_len: int = 10
    adapter_layers: int = 4
    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-2
    image_questions: int = 3000
    text_questions: int = 1000
    caption_examples: int = 1500
    max_new_tokens: int = 24

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


def pretrain_corpus(scenes: Sequence[Scene], facts: Sequence[Fact], rng: np.random.Generator) -> list[str]:
    """Text the base reads: reading exercises, captions, quizzes with a text context, facts.

    Like web text for LLaMA: it states what scenes look like and how quizzes are answered, but
    never shows a picture. Every fact is stated and asked in a quiz (the base knows them all;
    the adapter trains on half of them and is tested on the other half).

    The reading exercises (a description, then its colour, shape, number and corner, one
    sentence each) matter: with descriptions and quizzes alone the base learned to repeat the
    number it had read but, after 600 steps, still guessed colours and shapes at chance.
    """
    docs = []
    for scene in scenes:
        statements = [scene_answer(scene, kind)[1] for kind in KINDS]
        for _ in range(2):
            docs.append(" ".join([describe(scene, rng)] + [statements[i] for i in rng.permutation(len(KINDS))]))
        docs.append(f"{scene.noun_phrase().capitalize()}. {statements[0]} {statements[1]}")  # short: colour, shape
        docs.append(captions(scene)[rng.integers(5)].capitalize() + ".")
        ex = scene_question(scene, KINDS[rng.integers(len(KINDS))], rng, "text", None)
        docs.append(ex.prompt + ex.response)
    for fact in facts:
        ex = knowledge_question(fact)
        docs += [fact.solution] * 10 + [f"Question: {fact.question}\nAnswer: {fact.solution}"] * 4
        docs += [ex.prompt + ex.response] * 8
    order = rng.permutation(len(docs))
    return [docs[i] for i in order]


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
def pretrain_scene_base(corpus: Sequence[str], config: MultimodalConfig, progress: bool = True):
    """Train a SentencePiece tokenizer and pretrain a small LLaMA on the scene corpus.

    Uses the project's one training loop (:func:`adapterlab.train.train`) on windows of the
    token stream BOS doc EOS BOS doc EOS ... Returns (model, tokenizer, metrics); the model is
    frozen (requires_grad False) and in eval mode.
    """
    from .data import text_windows
    from .model import Llama, LlamaConfig, init_weights
    from .tokenizer import Tokenizer
    from .train import TrainConfig, train

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
                     seed=config.seed, checkpoint=False, record_gates=False, progress=progress,
                     desc="pretrain the base on scene text", log_every=25)
    metrics = train(model, data, tc)
    metrics["corpus_tokens"] = len(stream)
    model.requires_grad_(False).eval()
    return model, tokenizer, metrics


BASE_VERSION = 1  # bump when the corpus or the pretraining code changes what gets built
BASE_FIELDS = ("seed", "train_scenes", "vocab_size", "dim", "n_layers", "n_heads", "pretrain_steps",
               "pretrain_batch_size", "pretrain_seq_len", "pretrain_lr")


def scene_base_dir(config: MultimodalConfig, corpus: Sequence[str]) -> Path:
    """The cache folder of a config's base: ``<cache>/scenes-<hash of the base settings and corpus>``."""
    import hashlib

    from .tinyworld import cache_root

    blob = json.dumps({"config": {k: getattr(config, k) for k in BASE_FIELDS}, "version": BASE_VERSION,
                       "corpus": hashlib.sha256("\n".join(corpus).encode()).hexdigest()}, sort_keys=True)
    return cache_root() / f"scenes-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def load_scene_base(corpus: Sequence[str], config: MultimodalConfig, progress: bool = True, cache: bool = True):
    """The pretrained base for a config: from the cache folder when it is there, else pretrained
    (and, with cache=True, saved there atomically; concurrent callers wait for one build).
    Returns (model, tokenizer, info) with info["cached"] telling which happened."""
    from .tinyworld import file_lock, publish_base, read_base

    if not cache:
        model, tokenizer, metrics = pretrain_scene_base(corpus, config, progress)
        return model, tokenizer, {"cached": False, "final_loss": metrics["final_loss"], "steps": metrics["steps"]}
    folder = scene_base_dir(config, corpus)
    with file_lock(folder.with_name(folder.name + ".lock")):  # another process building the same base: wait
        if not (folder / "params.json").is_file():
            model, tokenizer, metrics = pretrain_scene_base(corpus, config, progress)
            publish_base(model, tokenizer, folder, extra={"final_loss": metrics["final_loss"], "steps": metrics["steps"],
                                                          "config": config.to_dict(), "version": BASE_VERSION})
            return model, tokenizer, {"cached": False, "final_loss": metrics["final_loss"],
                                      "steps": metrics["steps"], "folder": str(folder)}
    model = read_base(folder)
    info = json.loads((folder / "tinyworld.json").read_text())
    return model, model.tokenizer, {"cached": True, "final_loss": info["final_loss"], "steps": info["steps"],
                                    "folder": str(folder)}


# --------------------------------------------------------------------------- images into the model
def image_tokens(model: nn.Module, features: Optional[torch.Tensor], image_ids: torch.Tensor) -> Optional[torch.Tensor]:
    """I_p = visual_proj(features[image_ids]) per example; 0 where image_ids < 0 (no picture).

    features: (N, visual_dim) frozen encoder features of all pictures, or None (text-only
    model: returns None). image_ids: (B,) long. Returns (B, dim) or None.
    """
    if features is None:
        return None
    image_ids = image_ids.to(features.device)
    device = model.visual_proj.fc1.weight.device
    has_image = (image_ids >= 0).to(device=device, dtype=features.dtype)[:, None]  # (B, 1)
    feats = features[image_ids.clamp(min=0)].to(device)  # (B, visual_dim)
    return model.visual_proj(feats) * has_image  # (B, dim)


class ImageTokenBridge(nn.Module):
    """Lets :func:`adapterlab.train.train`, which calls ``model(tokens)``, train with pictures.

    Interim bridge until the loop can pass per-example model inputs: column 0 of ``tokens``
    carries each example's picture (index + 1; 0 = none); the bridge looks up the frozen
    features, makes the image token I_p with the model's projection, runs the model on the
    rest and puts a dummy position in front of the logits, so the loop's shift of labels
    against logits still lines up (the dummy position's label is always ignored).
    """

    def __init__(self, model: nn.Module, features: Optional[torch.Tensor]):
        super().__init__()
        self.model = model
        self.register_buffer("features", features, persistent=False)

    @property
    def layers(self):  # the gate recorder reads model.layers and model.config
        return self.model.layers

    @property
    def config(self):
        return self.model.config

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        image_ids = tokens[:, 0] - 1  # (B,)
        visual = image_tokens(self.model, self.features, image_ids)
        logits = self.model(tokens[:, 1:], visual=visual)  # (B, T-1, vocab)
        return F.pad(logits, (0, 0, 1, 0))  # (B, T, vocab): dummy position 0


def example_dataset(tokenizer, examples: Sequence[Example], max_seq_len: int):
    """Examples -> a TokenDataset for the bridge: [picture code] + BOS prompt response EOS."""
    from .data import IGNORE_INDEX, TokenDataset

    tokens, labels = [], []
    for ex in examples:
        prompt = tokenizer.encode(ex.prompt, bos=True, eos=False)
        response = tokenizer.encode(ex.response, bos=False, eos=True)
        if len(prompt) + len(response) > max_seq_len:
            raise ValueError(f"example {ex.prompt!r:.60} has {len(prompt) + len(response)} tokens, more than "
                             f"max_seq_len={max_seq_len}")
        code = 0 if ex.image is None else ex.image + 1
        tokens.append([code] + prompt + response)
        labels.append([IGNORE_INDEX] * (1 + len(prompt)) + response)
    return TokenDataset(tokens, labels, source="scene examples")


def train_adapter(model: nn.Module, tokenizer, examples: Sequence[Example], features: Optional[torch.Tensor],
                  config: MultimodalConfig, out_dir: Optional[str | Path], progress: bool = True,
                  desc: str = "adapter") -> dict:
    """Tune the adapter of ``model`` (already attached) on the examples with the project's loop."""
    from .train import TrainConfig, train

    data = example_dataset(tokenizer, examples, model.config.max_seq_len)
    tc = TrainConfig(steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                     warmup_steps=max(1, config.steps // 10), weight_decay=0.02, seed=config.seed,
                     out_dir=str(out_dir) if out_dir is not None else None, checkpoint=False,
                     progress=progress, desc=desc, log_every=10)
    return train(ImageTokenBridge(model, features), data, tc)


# --------------------------------------------------------------------------- answering
@torch.no_grad()
def answer(model: nn.Module, tokenizer, examples: Sequence[Example], features: Optional[torch.Tensor],
           max_new_tokens: int = 24, batch_size: int = 128) -> list[str]:
    """Greedy answers (the paper decodes greedily) to the examples' prompts, with their pictures."""
    from .generate import generate_tokens

    outputs = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = [tokenizer.encode(ex.prompt, bos=True, eos=False) for ex in chunk]
        ids = torch.tensor([-1 if ex.image is None else ex.image for ex in chunk], device=model.device)
        visual = image_tokens(model, features, ids)
        new = generate_tokens(model, prompts, max_new_tokens=max_new_tokens, greedy=True, visual=visual,
                              eos_id=tokenizer.eos_id)
        outputs += [tokenizer.decode(t).strip() for t in new]
    return outputs


def score(examples: Sequence[Example], outputs: Sequence[str]) -> dict:
    """Accuracy overall / per context / per kind of picture question, and caption BLEU-4."""
    mc = [(ex, out) for ex, out in zip(examples, outputs) if ex.context in CONTEXTS]
    correct = [parse_answer(out) == ex.answer for ex, out in mc]
    by_context = {c: float(np.mean([ok for (ex, _), ok in zip(mc, correct) if ex.context == c] or [float("nan")]))
                  for c in CONTEXTS}
    by_kind = {k: float(np.mean([ok for (ex, _), ok in zip(mc, correct) if ex.context == "image" and ex.kind == k]))
               for k in KINDS}
    caps = [(ex, out) for ex, out in zip(examples, outputs) if ex.context == "caption"]
    bleu = corpus_bleu([out for _, out in caps], [ex.references for ex, _ in caps]) if caps else None
    return {
        "accuracy": float(np.mean(correct)),
        "accuracy_by_context": by_context,
        "image_accuracy_by_kind": by_kind,
        "counts": {c: sum(ex.context == c for ex, _ in mc) for c in CONTEXTS} | {"caption": len(caps)},
        "bleu4": None if bleu is None else bleu["bleu"],
        "bleu": bleu,
    }


# --------------------------------------------------------------------------- pictures of the results
def save_prediction_grid(path: str | Path, images: torch.Tensor, rows: Sequence[dict], columns: int = 4) -> Path:
    """One PNG with each picture above its question, both models' answers and the caption.

    rows: dicts with "image" (index into images), "question", "truth" (letter), "truth_text",
    "multimodal", "text_only", "caption" (strings).
    """
    from .gates import _pyplot

    plt = _pyplot()
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
    import copy

    from .adapter import AdapterConfig, add_adapter, count_trainable
    from .train import write_metrics
    from .vision import encode_images, pretrain_scene_encoder

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
        add_adapter(model, AdapterConfig(prompt_len=config.prompt_len, layers=config.adapter_layers,
                                         visual_dim=encoder.visual_dim if multimodal else None), seed=config.seed)
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
