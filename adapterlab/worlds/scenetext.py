"""What the scenes are asked and told: questions, captions, the base's reading, and scores.

Pure Python and numpy on top of :mod:`adapterlab.worlds.scenes` (the pictures) and
:mod:`adapterlab.metrics.bleu` (the caption metric); no model, no torch.

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
format (solution, then "The answer is (X)."), answered by greedy decoding.

One simplification keeps a tiny base able to do this after about a minute of pretraining:
each attribute has exactly four values and the options list them in a fixed order, so the
letter is a lookup of the solution's word. With shuffled options the letter needs in-context
matching ("which option says blue?"), which a ~1M-parameter base had not learned after
3,000 pretraining steps (accuracy still at chance, measured while building this module).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from ..metrics.bleu import corpus_bleu
from .scenes import COLOURS, CORNERS, COUNTS, NUMBER_WORDS, SHAPES, Scene

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


# --------------------------------------------------------------------------- what the base reads
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


# --------------------------------------------------------------------------- scores
def score(examples: Sequence[Example], outputs: Sequence[str]) -> dict:
    """Accuracy overall / per context / per kind of picture question, and caption BLEU-4."""
    mc = [(ex, out) for ex, out in zip(examples, outputs) if ex.context in CONTEXTS]
    correct = [parse_answer(out) == ex.answer for ex, out in mc]
    by_context = {c: float(np.mean([ok for (ex, _), ok in zip(mc, correct) if ex.context == c] or [float("nan")]))
                  for c in CONTEXTS}
    by_kind = {k: float(np.mean([ok for (ex, _), ok in zip(mc, correct) if ex.context == "image" and ex.kind == k]
                                or [float("nan")]))  # nan: no question of that kind in the set
               for k in KINDS}
    caps = [(ex, out) for ex, out in zip(examples, outputs) if ex.context == "caption"]
    bleu = corpus_bleu([out for _, out in caps], [ex.references for ex, _ in caps]) if caps else None
    return {
        "accuracy": float(np.mean(correct or [float("nan")])),
        "accuracy_by_context": by_context,
        "image_accuracy_by_kind": by_kind,
        "counts": {c: sum(ex.context == c for ex, _ in mc) for c in CONTEXTS} | {"caption": len(caps)},
        "bleu4": None if bleu is None else bleu["bleu"],
        "bleu": bleu,
    }


__all__ = [
    "LETTERS", "CONTEXTS", "KINDS", "OPTIONS", "IMAGE_QUESTIONS", "NONE_CONTEXT", "CAPTION_PROMPT", "Example", "Fact",
    "captions", "describe", "scene_answer", "knowledge_facts", "mc_prompt", "mc_response", "parse_answer",
    "scene_question", "knowledge_question", "caption_example", "pretrain_corpus", "score",
]
