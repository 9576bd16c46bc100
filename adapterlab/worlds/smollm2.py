"""A real task on a real pretrained LLaMA: SmolLM2-135M-Instruct learns a strict answer format.

Asked "What is the capital of France?", the base chats ("The capital of France is Paris. Paris is
known for ..."). The task wants its answer in a format it never uses by itself: one sentence, then a
last line ``Answer: Paris``, scored by exact match of that line (as GSM8K scores its ``#### 42``).
The questions are of three kinds (capitals, opposites, plurals); the adapter is tuned on some facts of
each kind and scored on facts it never saw, so what rises is the base's own knowledge, unlocked in a
new format (the paper's claim), not facts learnt from the tuning set. (A bare "Paris" as the whole
reply is harder for a model this small: asked for one word, it still writes a sentence, and its
knowledge surfaces after "The capital of France is", not at the first token.)

What the base knew is measured before and after tuning: its loss on real English text the tuning
never sees (a fixed slice of Python's bundled documentation, ``pydoc_data.topics``), and how many of
a fixed set of general questions (none of the task's kinds; kept because the base answers them) it
still answers. :func:`run_real_demo` does all of it and writes metrics.json, gates.png, the adapter
and every answer before and after.
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from ..adapter import AdapterConfig, add_adapter, count_trainable, remove_adapter
from ..data import TokenDataset, instruction_dataset
from ..gates import GateRecorder
from ..generate import generate_tokens
from ..io.adapters import save_adapter
from ..io.files import atomic_write_text, build_machine, cpu_threads, default_threads, progress_bar
from ..losses import lm_loss
from ..metrics.squad import normalize_answer
from ..model import Llama
from ..tokenizer import Tokenizer
from ..train import TrainConfig, train
from .tinyworld import load_llama

PathLike = Union[str, os.PathLike]
BASE = "smollm2"  # adapterlab.load_llama's name of SmolLM2-135M-Instruct (its installed GGUF file)

# --------------------------------------------------------------------------- the task's facts
# (key, answer, other accepted answers...). Each kind turns a key into a question and a reply.
CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("China", "Beijing"), ("Russia", "Moscow"), ("the United Kingdom", "London"), ("Egypt", "Cairo"),
    ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Austria", "Vienna"),
    ("Poland", "Warsaw"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"), ("the Netherlands", "Amsterdam"), ("Belgium", "Brussels"), ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"), ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Cuba", "Havana"), ("India", "New Delhi"), ("Thailand", "Bangkok"), ("South Korea", "Seoul"),
    ("Kenya", "Nairobi"), ("Hungary", "Budapest"), ("the Czech Republic", "Prague"), ("Turkey", "Ankara"),
    ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Australia", "Canberra"), ("Vietnam", "Hanoi"),
    ("Indonesia", "Jakarta"), ("the Philippines", "Manila"), ("Colombia", "Bogota", "Bogotá"),
    ("Venezuela", "Caracas"), ("Switzerland", "Bern", "Berne"), ("Scotland", "Edinburgh"),
    ("Saudi Arabia", "Riyadh"), ("Pakistan", "Islamabad"), ("Nigeria", "Abuja"), ("Morocco", "Rabat"),
    ("Ethiopia", "Addis Ababa"), ("Iceland", "Reykjavik", "Reykjavík"), ("Romania", "Bucharest"),
    ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"), ("Malaysia", "Kuala Lumpur"),
    ("New Zealand", "Wellington"), ("Jamaica", "Kingston"), ("Lebanon", "Beirut"), ("Syria", "Damascus"),
    ("Afghanistan", "Kabul"), ("Nepal", "Kathmandu"), ("Bangladesh", "Dhaka"), ("Ukraine", "Kyiv", "Kiev"),
    ("Brazil", "Brasilia", "Brasília"),
]
OPPOSITES = [
    ("hot", "cold"), ("big", "small", "little"), ("up", "down"), ("fast", "slow"), ("happy", "sad", "unhappy"),
    ("tall", "short"), ("wet", "dry"), ("day", "night"), ("black", "white"), ("left", "right"), ("good", "bad", "evil"),
    ("rich", "poor"), ("early", "late"), ("full", "empty"), ("thick", "thin"), ("strong", "weak"),
    ("win", "lose"), ("push", "pull"), ("loud", "quiet", "soft"), ("high", "low"), ("near", "far"),
    ("in", "out"), ("on", "off"), ("first", "last"), ("true", "false"), ("love", "hate"), ("buy", "sell"),
    ("clean", "dirty"), ("cheap", "expensive"), ("deep", "shallow"), ("give", "take", "receive"),
    ("inside", "outside"), ("above", "below"), ("north", "south"), ("east", "west"), ("alive", "dead"),
    ("friend", "enemy", "foe"), ("remember", "forget"), ("asleep", "awake"), ("laugh", "cry"),
    ("wide", "narrow"), ("smooth", "rough"), ("open", "closed", "close", "shut"), ("old", "young", "new"),
    ("light", "dark", "heavy"), ("start", "finish", "end", "stop"), ("question", "answer"), ("yes", "no"),
    ("always", "never"), ("before", "after"), ("young", "old"), ("sweet", "sour", "bitter"),
]
PLURALS = [
    ("mouse", "mice"), ("child", "children"), ("man", "men"), ("woman", "women"), ("foot", "feet"),
    ("tooth", "teeth"), ("goose", "geese"), ("person", "people", "persons"), ("sheep", "sheep"), ("fish", "fish", "fishes"),
    ("ox", "oxen"), ("cactus", "cacti", "cactuses"), ("box", "boxes"), ("bus", "buses", "busses"),
    ("baby", "babies"), ("city", "cities"), ("knife", "knives"), ("leaf", "leaves"), ("wolf", "wolves"),
    ("potato", "potatoes"), ("tomato", "tomatoes"), ("dog", "dogs"), ("cat", "cats"), ("church", "churches"),
    ("dish", "dishes"), ("party", "parties"), ("life", "lives"), ("wife", "wives"), ("half", "halves"),
    ("hero", "heroes"), ("fox", "foxes"), ("glass", "glasses"), ("lady", "ladies"), ("story", "stories"),
    ("watch", "watches"), ("book", "books"), ("apple", "apples"), ("key", "keys"), ("day", "days"),
    ("house", "houses"), ("car", "cars"), ("tree", "trees"), ("bird", "birds"), ("girl", "girls"),
    ("boy", "boys"), ("horse", "horses"), ("class", "classes"), ("brush", "brushes"),
]
QUESTIONS = {
    "capital": "What is the capital of {}?",
    "opposite": 'What is the opposite of "{}"?',
    "plural": 'What is the plural of "{}"?',
}
SENTENCES = {  # the sentence the reply starts with: the base's own way of answering
    "capital": "The capital of {} is {}.",
    "opposite": 'The opposite of "{}" is "{}".',
    "plural": 'The plural of "{}" is "{}".',
}
KINDS = tuple(QUESTIONS)
ANSWER_LINE = "Answer:"  # the last line of a reply in the task's format: "Answer: Paris"


@dataclass(frozen=True)
class Item:
    """One question of the task: its kind, the key it asks about, the answer and other accepted answers."""

    kind: str
    key: str
    answer: str
    also: tuple[str, ...] = ()

    @property
    def question(self) -> str:
        return QUESTIONS[self.kind].format(self.key)

    @property
    def answers(self) -> tuple[str, ...]:
        return (self.answer,) + self.also

    @property
    def reply(self) -> str:
        """The reply the task wants: 'The capital of France is Paris.\\nAnswer: Paris'."""
        return SENTENCES[self.kind].format(self.key, self.answer) + f"\n{ANSWER_LINE} {self.answer}"

    def record(self) -> dict:
        """This item as an Alpaca record (instruction = the question, output = the reply)."""
        return {"instruction": self.question, "input": "", "output": self.reply, "answers": list(self.answers)}


def all_items() -> list[Item]:
    """Every fact of the task, kind by kind, in the tables' order."""
    tables = {"capital": CAPITALS, "opposite": OPPOSITES, "plural": PLURALS}
    return [Item(kind, row[0], row[1], tuple(row[2:])) for kind in KINDS for row in tables[kind]]


@dataclass(frozen=True)
class Task:
    """The tuning set and the held-out set: no key of a kind is in both."""

    train: list[Item]
    heldout: list[Item]


def make_task(n_train: int = 24, n_heldout: Optional[int] = 20, seed: int = 0) -> Task:
    """Shuffle the facts of each kind with ``seed``; the first ``n_train`` are tuned on, the next
    ``n_heldout`` held out (None: all the others). The same arguments give the same task."""
    smallest = min(sum(it.kind == k for it in all_items()) for k in KINDS)
    if n_train < 1 or (n_heldout is not None and n_heldout < 1) or n_train + (n_heldout or 1) > smallest:
        raise ValueError(f"make_task: n_train={n_train} and n_heldout={n_heldout} must each be >= 1 and together "
                         f"fit the smallest kind ({smallest} facts)")
    rng = random.Random(seed)
    train_items, heldout = [], []
    for kind in KINDS:
        items = [it for it in all_items() if it.kind == kind]
        rng.shuffle(items)
        stop = None if n_heldout is None else n_train + n_heldout
        train_items += items[:n_train]
        heldout += items[n_train:stop]
    return Task(train_items, heldout)


# --------------------------------------------------------------------------- scoring
def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """The prediction is one of the answers after normalisation (case, punctuation, articles, spaces)."""
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in answers)


def final_answer(reply: str) -> Optional[str]:
    """What the reply's last line gives after 'Answer:', or None when its last line is not such a line."""
    last = reply.strip().split("\n")[-1].strip()
    return last[len(ANSWER_LINE):].strip() if last.startswith(ANSWER_LINE) else None


def mentions(prediction: str, answers: Sequence[str]) -> bool:
    """One of the answers appears in the prediction as whole words (what the base knows, in any format)."""
    pred = f" {normalize_answer(prediction)} "
    return any(f" {normalize_answer(a)} " in pred for a in answers)


@dataclass(frozen=True)
class Reply:
    """A greedy reply: its text, and whether the model ended its turn within the tokens allowed."""

    text: str
    finished: bool


def is_correct(reply: Reply, item: Item) -> bool:
    """The task's score: a finished reply whose last line is 'Answer: X' with X an accepted answer."""
    given = final_answer(reply.text)
    return reply.finished and given is not None and exact_match(given, item.answers)


# --------------------------------------------------------------------------- what the base knew
# General questions, none of the task's kinds: (question, answer, other accepted answers...). Kept from a
# longer list: those the base answers (its greedy chat reply, 20 new tokens, mentions the answer).
GENERAL_FACTS = [
    ("What is the chemical symbol for gold?", "Au"),
    ("Who wrote Romeo and Juliet?", "Shakespeare", "William Shakespeare"),
    ("What gas do plants absorb from the air?", "carbon dioxide", "CO2"),
    ("What is the largest ocean on Earth?", "Pacific", "Pacific Ocean"),
    ("What is the tallest mountain in the world?", "Everest", "Mount Everest"),
    ("How many days are in a week?", "seven", "7"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci", "da Vinci", "Leonardo"),
    ("At what temperature in Celsius does water boil?", "100"),
    ("What is the largest mammal?", "blue whale"),
    ("What language is spoken in Brazil?", "Portuguese"),
    ("What is the currency of Japan?", "yen"),
    ("What language is spoken in Mexico?", "Spanish"),
    ("How many sides does a triangle have?", "three", "3"),
    ("What color is the sky on a clear day?", "blue"),
    ("Which organ pumps blood through the body?", "heart"),
    ("What is the largest hot desert in the world?", "Sahara"),
    ("Who developed the theory of relativity?", "Einstein", "Albert Einstein"),
    ("Who discovered penicillin?", "Fleming", "Alexander Fleming"),
    ("In what year did World War II end?", "1945"),
    ("What is the smallest prime number?", "2", "two"),
    ("Which musical instrument has 88 keys?", "piano"),
    ("What does a caterpillar turn into?", "butterfly", "moth"),
    ("What is the center of an atom called?", "nucleus"),
    ("What force keeps us on the ground?", "gravity"),
    ("What is the study of living things called?", "biology"),
    ("Who invented the telephone?", "Bell", "Alexander Graham Bell"),
    ("Who invented the light bulb?", "Edison", "Thomas Edison"),
    ("Which country is home to the Great Pyramids of Giza?", "Egypt"),
    ("What is the longest bone in the human body?", "femur"),
    ("What is the chemical formula of water?", "H2O"),
    ("How many sides does a hexagon have?", "six", "6"),
    ("Who wrote the play Hamlet?", "Shakespeare", "William Shakespeare"),
    ("What do cows produce that people drink?", "milk"),
    ("What is the primary language spoken in Germany?", "German"),
    ("What is the currency of the United States?", "dollar", "US dollar"),
    ("What is the currency of the United Kingdom?", "pound", "pound sterling"),
    ("What language is spoken in France?", "French"),
    ("What is the process by which plants make food from sunlight?", "photosynthesis"),
    ("Who was the first person to walk on the Moon?", "Neil Armstrong", "Armstrong"),
    ("What is the name of our galaxy?", "Milky Way"),
    ("What is the name of the longest river in Africa?", "Nile"),
    ("Which ocean lies between Europe and America?", "Atlantic", "Atlantic Ocean"),
    ("How many cents are in a dollar?", "100", "one hundred"),
    ("What is the main gas in the air we breathe?", "nitrogen"),
    ("Which season is the hottest?", "summer"),
    ("Which animal gives us wool?", "sheep"),
    ("How many letters are in the English alphabet?", "26", "twenty-six"),
    ("What is the largest city in the United States?", "New York", "New York City"),
    ("What is the chemical symbol for sodium?", "Na"),
    ("What is the chemical symbol for iron?", "Fe"),
    ("What language is spoken in Italy?", "Italian"),
    ("What language is spoken in Japan?", "Japanese"),
    ("In which country is the Taj Mahal?", "India"),
    ("In which city is the Statue of Liberty?", "New York", "New York City"),
    ("In which country is the Great Wall?", "China"),
    ("Which country is famous for kangaroos?", "Australia"),
    ("What is the hottest planet in our solar system?", "Venus"),
    ("What is the currency of India?", "rupee", "Indian rupee"),
    ("Who formulated the law of universal gravitation?", "Newton", "Isaac Newton"),
    ("What do spiders spin?", "web", "webs", "silk"),
    ("What is the main ingredient of bread?", "flour", "wheat"),
    ("How many seconds are in a minute?", "60", "sixty"),
    ("Which element has the chemical symbol H?", "hydrogen"),
    ("What is the largest moon of Saturn?", "Titan"),
    ("What do you call a person who fixes teeth?", "dentist"),
]


TEXT_TOPICS = ("naming", "exceptions", "execmodel")  # pydoc_data.topics entries: prose about Python


def english_text() -> str:
    """Real English prose that no tuning here sees: sections of Python's own reference manual, as
    every CPython ships them in ``pydoc_data.topics``."""
    from pydoc_data.topics import topics

    parts = [topics[name] for name in TEXT_TOPICS if name in topics] or [topics[k] for k in sorted(topics)]
    return "\n\n".join(parts)


def text_tokens(tokenizer: Tokenizer, n_tokens: int = 1024) -> torch.Tensor:
    """The first ``n_tokens`` tokens of :func:`english_text` -> (1, n_tokens)."""
    ids = tokenizer.encode(english_text(), bos=True, eos=False)[:n_tokens]
    if len(ids) < n_tokens:
        raise ValueError(f"text_tokens: Python's docs give only {len(ids)} tokens; ask for at most that many")
    return torch.tensor([ids], dtype=torch.long)


@torch.no_grad()
def text_loss(model: Llama, tokens: torch.Tensor) -> float:
    """Mean next-token cross-entropy of ``model`` on tokens (1, T) (in nats per token)."""
    was_training = model.training
    model.eval()
    try:
        return float(lm_loss(model, tokens.to(model.device)))
    finally:
        model.train(was_training)


def step0_losses(model: Llama, tokens: torch.Tensor, layers: Sequence[int] = (8, 30), prompt_len: int = 10,
                 seed: int = 0) -> dict:
    """The text loss of the base, and of the base with a fresh adapter in its top L layers (for each L):
    zero-init gates (the paper: the loss is the base's exactly) and random-init gates (the ablation).
    The model is left without an adapter."""
    out: dict = {"base": text_loss(model, tokens)}
    for L in layers:
        L = min(L, model.config.n_layers)
        row = {}
        for init in ("zero", "random"):
            add_adapter(model, AdapterConfig(prompt_len=prompt_len, layers=L, init=init), seed=seed)
            row[init] = text_loss(model, tokens)
            remove_adapter(model)
        out[f"L{L}"] = row
    return out


# --------------------------------------------------------------------------- prompts, data, answers
def chat_prompt(tokenizer: Tokenizer, question: str) -> list[int]:
    """The question as a user turn in the model's own chat template (ChatML with its default system
    prompt), ending with the header of the assistant's turn."""
    return tokenizer.chat([{"role": "user", "content": question}], add_generation_prompt=True)


def user_turn(instruction: str, input: str = "") -> str:
    """An Alpaca record's instruction (and input, if any) as the text of one user turn."""
    return instruction + (f"\n\n{input}" if input else "")


def chat_dataset(tokenizer: Tokenizer, records: Sequence[dict], source: str = "records",
                 max_seq_len: Optional[int] = None) -> TokenDataset:
    """Alpaca records as chat examples: the user turn (the instruction, then the input if any) in the
    model's chat template with no loss on it, then the output and the end-of-turn token (the loss).
    max_seq_len: cut longer examples (counted); one whose prompt fills the window is dropped (counted)."""
    return instruction_dataset(records, tokenizer, max_seq_len, source,
                               prompt_of=lambda tok, r: chat_prompt(tok, user_turn(r["instruction"], r["input"])))


@torch.no_grad()
def answer(model: Llama, tokenizer: Tokenizer, questions: Sequence[str], max_new_tokens: int = 24,
           batch_size: int = 32, progress=None) -> list[Reply]:
    """The model's greedy chat replies to ``questions``, ``batch_size`` at a time, each cut at
    ``max_new_tokens``. progress: a bar to ``update`` by the number of questions answered."""
    prompts = [chat_prompt(tokenizer, q) for q in questions]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    replies: list[Optional[Reply]] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        new = generate_tokens(model, [prompts[i] for i in batch], max_new_tokens=max_new_tokens, greedy=True,
                              eos_id=tokenizer.eos_id)
        for i, ids in zip(batch, new):  # generate_tokens cuts the end-of-turn off: fewer ids than allowed = ended
            replies[i] = Reply(tokenizer.decode(ids).strip(), finished=len(ids) < max_new_tokens)
        if progress is not None:
            progress.update(len(batch))
    return replies


def score_task(model: Llama, tokenizer: Tokenizer, items: Sequence[Item], max_new_tokens: int = 24,
               progress=None) -> list[dict]:
    """Per item: kind, question, expected answer, the reply and whether it is correct (:func:`is_correct`)."""
    replies = answer(model, tokenizer, [it.question for it in items], max_new_tokens, progress=progress)
    return [{"kind": it.kind, "question": it.question, "expected": it.answer, "reply": r.text,
             "correct": is_correct(r, it)} for it, r in zip(items, replies)]


def probe_facts(model: Llama, tokenizer: Tokenizer, facts: Sequence[tuple[str, ...]] = GENERAL_FACTS,
                max_new_tokens: int = 20, progress=None) -> list[dict]:
    """Per general question: the reply and whether it mentions the answer (any format counts)."""
    replies = answer(model, tokenizer, [f[0] for f in facts], max_new_tokens, progress=progress)
    return [{"question": f[0], "expected": f[1], "reply": r.text, "known": mentions(r.text, f[1:])}
            for f, r in zip(facts, replies)]


def accuracy(rows: Sequence[dict], key: str = "correct") -> float:
    return sum(bool(r[key]) for r in rows) / max(1, len(rows))


def by_kind(rows: Sequence[dict]) -> dict[str, float]:
    return {k: accuracy([r for r in rows if r["kind"] == k]) for k in KINDS if any(r["kind"] == k for r in rows)}


# --------------------------------------------------------------------------- the demo
REAL_THREADS = 2  # the real model's CPU threads unless $ADAPTERLAB_THREADS says otherwise: the demo's target is 2 cores


def real_model_threads() -> int:
    """CPU threads for the real model: ``$ADAPTERLAB_THREADS`` when set (0: torch's choice), else
    :data:`REAL_THREADS`. (The embedded tiny models keep 1: their matrices are too small to share.)"""
    return default_threads() if "ADAPTERLAB_THREADS" in os.environ else REAL_THREADS


@dataclass
class RealDemoConfig:
    """The settings of :func:`run_real_demo` (the defaults: a few minutes on 2 CPU threads).

    layers / prompt_len: the adapter (L top layers, K prompts). steps, batch_size, lr, warmup_steps: the
    tuning. n_train / n_heldout: facts per kind tuned on / held out. n_facts: how many general questions
    probe what the base knew (None: all). text_tokens: the length of the English text. identity_layers:
    the L of the step-0 comparison (zero-init vs random-init gates; (8, 30) adds the whole depth).
    max_new_tokens / facts_new_tokens: the longest reply to a task question / a general question.
    threads: torch's CPU threads (None: :func:`real_model_threads`). device: None -> CUDA when available.
    """

    layers: int = 8
    prompt_len: int = 10
    steps: int = 40
    batch_size: int = 8
    lr: float = 1e-2
    warmup_steps: int = 2
    n_train: int = 24
    n_heldout: int = 20
    n_facts: Optional[int] = None
    text_tokens: int = 1024
    identity_layers: tuple[int, ...] = (8,)
    max_new_tokens: int = 24
    facts_new_tokens: int = 20
    seed: int = 0
    threads: Optional[int] = None
    device: Optional[str] = None


ANSWERS_NAME = "answers.json"
STAGES = ("base", "before", "tuned", "after")  # what run_real_demo tells its ``report`` callback, in order


def run_real_demo(out_dir: PathLike, config: Optional[RealDemoConfig] = None,
                  base: Union[str, PathLike, Llama] = BASE, progress: bool = True,
                  report: Optional[Callable[[str, dict], None]] = None, callbacks: Sequence = ()) -> dict:
    """Tune an adapter on the real model's task and measure what it unlocked and what the base kept.

    base: ``"smollm2"`` (the installed SmolLM2-135M-Instruct), a path :func:`adapterlab.load_llama` reads,
    or a loaded Llama with a chat tokenizer in ``.tokenizer``; it is frozen, and left with the tuned adapter.
    report(stage, info): called at each of :data:`STAGES` as it is done (the command line prints the
    story from it): "base" (the model, its text loss, step 0), "before" / "after" (the scored rows of
    the held-out questions and of the general facts), "tuned" (the training run's metrics).
    callbacks: more training callbacks (the gates are recorded anyway).
    Writes to ``out_dir``: metrics.json, gates.jsonl + gates.png, the adapter (adapter.safetensors +
    adapter_config.json) and answers.json (every reply before and after). Returns the metrics.
    """
    config = config or RealDemoConfig()
    out = Path(out_dir)
    threads = config.threads if config.threads is not None else real_model_threads()
    tell = report or (lambda stage, info: None)
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0, cpu0 = time.perf_counter(), time.process_time()
    phases: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        phases[name] = round(now - since, 1)
        return now

    with cpu_threads(threads):
        model = base if isinstance(base, Llama) else load_llama(base, device=device, dtype=torch.float32)
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"run_real_demo: the base {base if not isinstance(base, Llama) else 'model'} has no "
                             "tokenizer with a chat template (model.tokenizer.chat); load one that has, e.g. 'smollm2'")
        model.requires_grad_(False)
        out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config.seed)
        task = make_task(config.n_train, config.n_heldout, config.seed)
        facts = GENERAL_FACTS[:config.n_facts]
        text = text_tokens(tokenizer, min(config.text_tokens, model.config.max_seq_len))  # a short context: less text
        t = lap("load", t0)

        step0 = step0_losses(model, text, config.identity_layers, config.prompt_len, config.seed)
        t = lap("step0", t)
        tell("base", {"base_params": model.num_params(), "config": model.config, "text_loss": step0["base"],
                      "text_tokens": text.shape[1], "step0": step0, "threads": torch.get_num_threads(),
                      "device": str(model.device)})

        before, facts_before = _answer_all(model, tokenizer, task.heldout, facts, config, progress, "before tuning")
        t = lap("answer_before", t)
        tell("before", {"rows": before, "items": task.heldout, "facts": facts_before})

        add_adapter(model, AdapterConfig(prompt_len=config.prompt_len, layers=min(config.layers, model.config.n_layers)),
                    seed=config.seed)
        data = chat_dataset(tokenizer, [it.record() for it in task.train], source="smollm2 task")
        tuned = train(model, data, TrainConfig(
            steps=config.steps, batch_size=config.batch_size, lr=config.lr, warmup_steps=config.warmup_steps,
            length_group=1, log_every=5, seed=config.seed, checkpoint=False, progress=progress,
            desc="tuning the adapter"), callbacks=[GateRecorder(out, every=5), *callbacks])
        t = lap("train", t)
        tell("tuned", {**tuned, "n_train": len(task.train), "trainable_params": count_trainable(model)})

        after, facts_after = _answer_all(model, tokenizer, task.heldout, facts, config, progress, "after tuning")
        text_after = text_loss(model, text)
        lap("answer_after", t)
        used_threads = torch.get_num_threads()
        tell("after", {"rows": after, "items": task.heldout, "facts": facts_after, "before": before,
                       "facts_before": facts_before, "text_loss": text_after})
    save_adapter(model, out)

    metrics = {
        "base": "a loaded model" if isinstance(base, Llama) else str(base),
        "task": "answer in one sentence, then a last line 'Answer: X' (exact match of X)",
        "heldout_accuracy_before": accuracy(before), "heldout_accuracy_after": accuracy(after),
        "heldout_gain": accuracy(after) - accuracy(before),
        "heldout_by_kind_before": by_kind(before), "heldout_by_kind_after": by_kind(after),
        "heldout_known_before": accuracy([{"k": mentions(r["reply"], it.answers)} for r, it in zip(before, task.heldout)], "k"),
        "n_train": len(task.train), "n_heldout": len(task.heldout),
        "text_loss_before": step0["base"], "text_loss_after": text_after, "text_tokens": text.shape[1],
        "step0_text_loss": step0,
        "facts_kept_before": sum(r["known"] for r in facts_before),
        "facts_kept_after": sum(r["known"] and b["known"] for r, b in zip(facts_after, facts_before)),
        "facts_total": len(facts),
        "trainable_params": count_trainable(model), "base_params": model.num_params() - count_trainable(model),
        "train_final_loss": tuned["final_loss"], "train_seconds": tuned["train_seconds"],
        "seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(time.process_time() - cpu0, 1),
        "seconds_by_phase": phases,
        "threads": used_threads, "device": str(model.device), "vector_unit": build_machine()["cpu"],
        "torch": torch.__version__, "seed": config.seed,
        "config": {**asdict(config), "identity_layers": list(config.identity_layers)},
    }
    answers = {"heldout": [{**b, "reply_after": a["reply"], "correct_after": a["correct"]} for b, a in zip(before, after)],
               "facts": [{**b, "reply_after": a["reply"], "known_after": a["known"]} for b, a in zip(facts_before, facts_after)]}
    atomic_write_text(out / ANSWERS_NAME, json.dumps(answers, indent=1, ensure_ascii=False) + "\n")
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def _answer_all(model: Llama, tokenizer: Tokenizer, heldout: Sequence[Item], facts: Sequence[tuple[str, ...]],
                config: RealDemoConfig, progress: bool, when: str) -> tuple[list[dict], list[dict]]:
    """The held-out questions scored and the general facts probed, under one progress bar."""
    bar = progress_bar(total=len(heldout) + len(facts), desc=f"answering ({when})", unit="question",
                       disable=not progress)
    try:
        rows = score_task(model, tokenizer, heldout, config.max_new_tokens, progress=bar)
        known = probe_facts(model, tokenizer, facts, config.facts_new_tokens, progress=bar)
    finally:
        bar.close()
    return rows, known
