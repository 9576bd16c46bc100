"""The multi-modal LLaMA-Adapter (Sec. 3.3) on the embedded scenes: tasks, BLEU-4, training, demo.

Tasks, in the style of ScienceQA (multiple choice, three context categories) and COCO (captions):

    Question: What colour are the shapes in the picture?
    Context: N/A
    Options: (A) blue (B) red (C) orange (D) green
    Answer: The answer is (B).

- context "image": the answer is in the picture only (the text context is "N/A");
- context "text":  the answer is in the text context (a description of another scene, no picture);
- context "none":  general knowledge the base model read during pretraining (colours of things,
  corners of shapes, mixing paints, small sums).
- captions: "Caption the picture." -> "three red circles in the top left corner", scored with BLEU-4
  against five reference captions per picture, as COCO does.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from .scenes import COLOURS, CORNERS, COUNTS, NUMBER_WORDS, PLURAL, SHAPES, Scene

LETTERS = "ABCD"
CONTEXTS = ("image", "text", "none")
ANSWER_RE = re.compile(r"answer is \(([A-D])\)")


@dataclass
class Example:
    """One training or evaluation record.

    prompt/response: the text the model reads and the text it must write. image: index of the
    picture in the image tensor (None: no picture). context: "image", "text", "none" or "caption".
    answer: the correct letter (multiple choice) ; references: reference captions (captions).
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
    templates = [
        f"The picture shows {np_} in the {corner} corner.",
        f"In the picture {there_is(scene)} {np_}. They are in the {corner} corner."
        if scene.count > 1 else f"In the picture there is {np_}. It is in the {corner} corner.",
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


def scene_answer(scene: Scene, kind: str) -> tuple[str, tuple[str, ...]]:
    """The true value of one attribute and all values it could take (as option words)."""
    if kind == "colour":
        return scene.colour, COLOURS
    if kind == "shape":
        return scene.shape, SHAPES
    if kind == "count":
        return NUMBER_WORDS[scene.count], tuple(NUMBER_WORDS[c] for c in COUNTS)
    if kind == "corner":
        return scene.corner, CORNERS
    raise ValueError(f"unknown question kind {kind!r}; expected one of {KINDS}")


# --------------------------------------------------------------------------- general knowledge ("none")
def knowledge_facts() -> list[tuple[str, str, tuple[str, ...], str]]:
    """(question, answer, candidate answers, statement) for the no-context questions."""
    facts = []
    things = {
        "the sky on a sunny day": "blue", "grass": "green", "a banana": "yellow", "a tomato": "red",
        "a carrot": "orange", "a plum": "purple", "a lemon": "yellow", "a strawberry": "red",
        "a leaf in summer": "green", "the sea": "blue", "a pumpkin": "orange", "a grape": "purple",
    }
    for thing, colour in things.items():
        facts.append((f"What colour is {thing}?", colour, COLOURS, f"The colour of {thing} is {colour}."))
    mixes = {("red", "yellow"): "orange", ("blue", "yellow"): "green", ("red", "blue"): "purple"}
    for (a, b), c in mixes.items():
        facts.append((f"Which colour do you get when you mix {a} and {b} paint?", c, COLOURS,
                      f"If you mix {a} and {b} paint you get {c}."))
    corners = {"circle": "zero", "triangle": "three", "square": "four", "cross": "twelve"}
    for shape, n in corners.items():
        facts.append((f"How many corners does a {shape} have?", n, tuple(corners.values()),
                      f"A {shape} has {n} corners."))
    shaped = {"a wheel": "circle", "a coin": "circle", "a slice of pizza": "triangle", "a plus sign": "cross",
              "a chess board": "square", "a window pane": "square", "a tent from the front": "triangle",
              "a red cross sign": "cross"}
    for thing, shape in shaped.items():
        facts.append((f"What shape is {thing}?", shape, SHAPES, f"{thing.capitalize()} has the shape of a {shape}."))
    words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
    for a in range(1, 5):
        for b in range(1, 5):
            facts.append((f"What is {words[a]} plus {words[b]}?", words[a + b], words[2:],
                          f"{words[a].capitalize()} plus {words[b]} is {words[a + b]}."))
    return facts


# --------------------------------------------------------------------------- prompts
def choose_options(answer: str, candidates: Sequence[str], rng: np.random.Generator) -> tuple[list[str], str]:
    """Four options (the answer and three distractors) in random order -> (options, correct letter)."""
    distractors = [c for c in candidates if c != answer]
    picked = [distractors[i] for i in rng.permutation(len(distractors))[:3]] + [answer]
    options = [picked[i] for i in rng.permutation(4)]
    return options, LETTERS[options.index(answer)]


def mc_prompt(question: str, context: str, options: Sequence[str]) -> str:
    """ScienceQA-style prompt: Question / Context / Options (A)...(D) / Answer:"""
    opts = " ".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))
    return f"Question: {question}\nContext: {context}\nOptions: {opts}\nAnswer:"


def mc_response(letter: str) -> str:
    return f" The answer is ({letter})."


CAPTION_PROMPT = "Caption the picture.\nCaption:"


def parse_answer(text: str) -> Optional[str]:
    """The letter in 'The answer is (X).' or None when the text has no such answer."""
    m = ANSWER_RE.search(text)
    return m.group(1) if m else None


def image_example(scene: Scene, image: int, kind: str, rng: np.random.Generator) -> Example:
    answer, candidates = scene_answer(scene, kind)
    options, letter = choose_options(answer, candidates, rng)
    q = IMAGE_QUESTIONS[kind][rng.integers(2)]
    return Example(mc_prompt(q, "N/A", options), mc_response(letter), "image", image, letter, kind)


def text_example(scene: Scene, kind: str, rng: np.random.Generator) -> Example:
    answer, candidates = scene_answer(scene, kind)
    options, letter = choose_options(answer, candidates, rng)
    q = IMAGE_QUESTIONS[kind][rng.integers(2)]
    return Example(mc_prompt(q, describe(scene, rng), options), mc_response(letter), "text", None, letter, kind)


def knowledge_example(fact: tuple, rng: np.random.Generator) -> Example:
    question, answer, candidates, _ = fact
    options, letter = choose_options(answer, candidates, rng)
    return Example(mc_prompt(question, "N/A", options), mc_response(letter), "none", None, letter, "knowledge")


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
        if not refs:
            raise ValueError(f"corpus_bleu: candidate {cand!r} has no reference caption")
        cw = caption_tokens(cand)
        rws = [caption_tokens(ref) for ref in refs]
        c += len(cw)
        r += min((abs(len(rw) - len(cw)), len(rw)) for rw in rws)[1]
        for n in range(1, max_n + 1):
            counts = ngrams(cw, n)
            max_ref = Counter()
            for rw in rws:
                max_ref |= ngrams(rw, n)  # element-wise max over references
            matches[n - 1] += sum(min(k, max_ref[g]) for g, k in counts.items())
            totals[n - 1] += max(len(cw) - n + 1, 0)
    precisions = [m / t if t else 0.0 for m, t in zip(matches, totals)]
    bp = 1.0 if c > r else (math.exp(1 - r / c) if c else 0.0)
    bleu = bp * math.exp(sum(math.log(p) for p in precisions) / max_n) if min(precisions) > 0 else 0.0
    return {"bleu": bleu, "precisions": precisions, "brevity_penalty": bp, "c": c, "r": r}
