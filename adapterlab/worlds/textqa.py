"""Extractive question answering on the tiny world (SQuAD-style), and the pretrained text encoder it tunes.

**The tasks.** A short paragraph (2-5 sentences) states facts about one or two people, in the
corpus's own phrasings, shuffled; a question asks about one of them, and its answer is a span of
the paragraph (the SQuAD v1.1 form)::

    context:  "Every morning Celia feeds the parrot. Paula plays the harp. Celia works as a pilot."
    question: "What does Celia do for a living?"          answer: "pilot" (answer_start 77)

In the v2.0-style set about a third of the questions have no answer in the paragraph: they ask
about an attribute the paragraph does not state for that person, or about a person it does not
mention (while it states that attribute for someone else), so the model must notice that the
answer is missing, as SQuAD 2.0's unanswerable questions demand.

*Answers must be read, not remembered.* The encoder is pretrained on the tiny world's text, so it
knows every person's true city, pet and so on. Every paragraph therefore states freshly drawn
values, not the world's: in train and val a value is drawn at random (the world's own value only
by chance), and in test it is always *different* from the world's fact, so memorised knowledge
gives the wrong answer there. Test paragraphs are, moreover, about the world's held-out people
(``World.heldout_people``), whom no training or validation paragraph mentions. Within a paragraph
no value occurs twice, so each answer's text is unique in its context.

Records have the SQuAD JSON record form ``{"id", "title", "context", "question", "answers":
{"text": [...], "answer_start": [...]}}`` (an empty list: no answer); :func:`save_squad_json` and
:func:`load_squad_json` write and read the official file layout, and :func:`adapterlab.metrics.squad.evaluate`
scores predictions with the official semantics.

**The encoder's input.** Token ids are the tiny-world SentencePiece pieces followed by four
special ids, [CLS] [SEP] [MASK] [PAD] (:class:`EncoderVocab`). A question and its paragraph are
laid out as BERT and RoBERTa do::

    [CLS] question [SEP] context [SEP] [PAD] ...        mask: True up to the last [SEP]

and a span head scores every token as the answer's start and as its end (``set_head(model, 2)``).
No answer is the span (0, 0), the [CLS] position. :func:`predict_spans` takes the best span of at
most ``max_answer_tokens`` tokens inside the context and, for v2.0, answers "" when the [CLS]
score (the null score) beats it.

**The pretrained base.** :func:`build_text_base` pretrains a small RoBERTa-style
:class:`~adapterlab.encoders.transformer.TextEncoder` by masked-language modelling on the tiny-world
pretraining corpus (15% of the tokens chosen; of those 80% become [MASK], 10% a random token, 10%
stay), with one CPU thread and fixed seeds, so every machine builds the same bytes. It never sees
a question paired with a span: extractive QA is new to it. The folder is shipped in the package
or built once into the cache, like the tiny-world LLaMA (``files.shipped_base``, ``files.cache_root``).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..encoders.transformer import TextEncoder, TextEncoderConfig, init_encoder_weights, load_encoder, save_encoder
from ..io.files import atomic_write_text, base_folder, build_machine
from ..metrics.squad import answer_texts
from .tinyworld import (
    ATTRIBUTES, QUESTIONS, STATEMENTS, Recipe, World, article, build_world, corpus_hash,
    pretrain_corpus, train_tokenizer,
)
from ..tokenizer import Tokenizer
from ..train import TrainConfig, train

PathLike = Union[str, os.PathLike]
VERSIONS = ("1.1", "2.0")
SPLIT_SIZES = {"train": 1000, "val": 200, "test": 500}  # questions per split
NO_ANSWER_SHARE = 1 / 3  # of the v2.0-style questions
QA_MAX_LEN = 64  # tokens of [CLS] question [SEP] context [SEP]: the longest record needs about 50


# --------------------------------------------------------------------------- the tasks
@dataclass(frozen=True)
class Mention:
    """One fact a paragraph states: ``value`` starts at character ``start`` of the context."""

    name: str
    attribute: str
    value: str
    start: int


def draw_value(rng: random.Random, world: World, name: str, attribute: str, taken: set[str],
               differ_from_world: bool) -> str:
    """A value for one fact of a paragraph: not ``taken`` by another fact of the paragraph and,
    when ``differ_from_world``, not the person's true value in the world."""
    banned = set(taken) | ({world.person(name).get(attribute)} if differ_from_world else set())
    return rng.choice([v for v in ATTRIBUTES[attribute] if v not in banned])


def state_fact(rng: random.Random, name: str, attribute: str, value: str) -> tuple[str, int]:
    """A sentence stating the fact in one of the corpus's phrasings -> (sentence, where the value starts)."""
    template = rng.choice(STATEMENTS[attribute])
    fill = dict(n=name, v=value, a=article(value))
    sentence = template.format(**fill)
    offset = len(template[: template.index("{v}")].format(**fill))
    assert sentence[offset: offset + len(value)] == value  # the template's own promise
    return sentence, offset


def paragraph(rng: random.Random, world: World, names: Sequence[str], differ_from_world: bool
              ) -> tuple[str, list[Mention]]:
    """2-5 shuffled sentences about one or two of ``names`` (each person 1-5 distinct attributes)."""
    n_sentences = rng.randint(2, 5)
    people = rng.sample(list(names), rng.choice([1, 2]))
    if len(people) == 1:
        counts = [n_sentences]
    else:
        first = rng.randint(max(1, n_sentences - len(ATTRIBUTES)), min(len(ATTRIBUTES), n_sentences - 1))
        counts = [first, n_sentences - first]
    facts, taken = [], {a: set() for a in ATTRIBUTES}
    for name, count in zip(people, counts):
        for attribute in rng.sample(list(ATTRIBUTES), count):
            value = draw_value(rng, world, name, attribute, taken[attribute], differ_from_world)
            taken[attribute].add(value)
            facts.append((name, attribute, value))
    rng.shuffle(facts)
    sentences, mentions, position = [], [], 0
    for name, attribute, value in facts:
        sentence, offset = state_fact(rng, name, attribute, value)
        mentions.append(Mention(name, attribute, value, position + offset))
        sentences.append(sentence)
        position += len(sentence) + 1  # the space that joins the sentences
    return " ".join(sentences), mentions


def unanswerable(rng: random.Random, names: Sequence[str], mentions: Sequence[Mention]) -> Optional[tuple[str, str]]:
    """(name, attribute) of a question the paragraph cannot answer, or None when none is fresh:
    an attribute it does not state for someone it mentions, or an attribute it states for someone
    while asking about a person it does not mention."""
    stated = {(m.name, m.attribute) for m in mentions}
    present = sorted({m.name for m in mentions})
    missing_attribute = [(n, a) for n in present for a in ATTRIBUTES if (n, a) not in stated]
    absent = [n for n in names if n not in present]
    other_person = [(n, m.attribute) for n in absent for m in mentions]
    kinds = [k for k in (missing_attribute, other_person) if k]
    return rng.choice(rng.choice(kinds)) if kinds else None


def paragraph_questions(rng: random.Random, names: Sequence[str], context: str, mentions: Sequence[Mention],
                        version: str) -> list[dict]:
    """1-3 questions about a paragraph (records without id and title); for v2.0 each has no
    answer with probability NO_ANSWER_SHARE."""
    records, asked = [], set()
    for _ in range(rng.randint(1, 3)):
        if version == "2.0" and rng.random() < NO_ANSWER_SHARE:
            pick = unanswerable(rng, names, mentions)
            if pick is None or pick in asked:
                continue
            (name, attribute), answers = pick, {"text": [], "answer_start": []}
        else:
            fresh = [m for m in mentions if (m.name, m.attribute) not in asked]
            if not fresh:
                continue
            m = rng.choice(fresh)
            (name, attribute), answers = (m.name, m.attribute), {"text": [m.value], "answer_start": [m.start]}
        asked.add((name, attribute))
        question = rng.choice(QUESTIONS[attribute]).format(n=name)
        records.append({"context": context, "question": question, "answers": answers})
    return records


def tiny_world() -> World:
    """The world of the tiny-world base (``tinyworld.Recipe()``)."""
    return build_world(Recipe())[0]


def make_split(version: str = "1.1", split: str = "train", n: Optional[int] = None, seed: int = 0,
               world: Optional[World] = None) -> list[dict]:
    """``n`` questions (default SPLIT_SIZES[split]) of one split, deterministic for (version, split, seed).

    train and val: paragraphs about the world's training people with values drawn at random;
    test: about its held-out people, every value different from the world's (see the module doc).
    """
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS} (SQuAD v1.1: always an answer; v2.0: some have "
                         f"none); got {version!r}")
    if split not in SPLIT_SIZES:
        raise ValueError(f"split must be one of {tuple(SPLIT_SIZES)}; got {split!r}")
    n = SPLIT_SIZES[split] if n is None else n
    if n < 1:
        raise ValueError(f"make_split: n must be >= 1; got {n}")
    world = world or tiny_world()
    test = split == "test"
    names = [p.name for p in (world.heldout_people if test else world.train_people)]
    rng = random.Random(f"adapterlab-textqa-{version}-{split}-{seed}")
    records: list[dict] = []
    for k in range(10 * n):  # (a paragraph gets at least one question: this never runs out)
        if len(records) == n:
            break
        context, mentions = paragraph(rng, world, names, differ_from_world=test)
        title = f"tinyworld-{split}-{k:04d}"
        for r in paragraph_questions(rng, names, context, mentions, version)[: n - len(records)]:
            records.append({"id": f"v{version}-{split}-{len(records):04d}", "title": title, **r})
    return records


def make_squad(version: str = "1.1", seed: int = 0, sizes: Optional[Mapping[str, int]] = None,
               world: Optional[World] = None) -> dict[str, list[dict]]:
    """The three splits of a SQuAD-style set: {"train": [...], "val": [...], "test": [...]} (sizes:
    SPLIT_SIZES, or override some, e.g. {"train": 64}). Different seeds give different sets."""
    sizes = {**SPLIT_SIZES, **(sizes or {})}
    world = world or tiny_world()
    return {split: make_split(version, split, sizes[split], seed, world) for split in SPLIT_SIZES}


# --------------------------------------------------------------------------- the official file layout
def save_squad_json(records: Sequence[Mapping], path: PathLike, version: Optional[str] = None) -> Path:
    """Write records as an official SQuAD file: {"version", "data": [{"title", "paragraphs":
    [{"context", "qas": [{"id", "question", "answers": [{"text", "answer_start"}], "is_impossible"}]}]}]}.

    version: "1.1" or "v2.0" (the official files' spelling); None -> "v2.0" when some question has
    no answer, else "1.1". Questions are grouped by title, then by context, in order of first
    appearance. ``is_impossible`` is written for v2.0 only. The file is written atomically.
    """
    version = version or ("v2.0" if any(not answer_texts(r) for r in records) else "1.1")
    articles: dict[str, dict[str, list]] = {}
    for r in records:
        texts, starts = list(r["answers"]["text"]), list(r["answers"]["answer_start"])
        qa = {"id": r["id"], "question": r["question"],
              "answers": [{"text": t, "answer_start": s} for t, s in zip(texts, starts)]}
        if version.lstrip("v").startswith("2"):
            qa["is_impossible"] = not texts
        articles.setdefault(r.get("title", ""), {}).setdefault(r["context"], []).append(qa)
    data = [{"title": title, "paragraphs": [{"context": c, "qas": qas} for c, qas in paragraphs.items()]}
            for title, paragraphs in articles.items()]
    return atomic_write_text(Path(path), json.dumps({"version": version, "data": data}, indent=1))


def load_squad_json(path: PathLike) -> list[dict]:
    """Read an official SQuAD file (v1.1 or v2.0) -> flat records ``{"id", "title", "context",
    "question", "answers": {"text": [...], "answer_start": [...]}}``, in file order."""
    path = Path(path)
    try:
        dataset = json.loads(path.read_text())
        records = []
        for article_ in dataset["data"]:
            for par in article_["paragraphs"]:
                for qa in par["qas"]:
                    answers = [] if qa.get("is_impossible") else qa["answers"]
                    records.append({"id": qa["id"], "title": article_.get("title", ""), "context": par["context"],
                                    "question": qa["question"],
                                    "answers": {"text": [a["text"] for a in answers],
                                                "answer_start": [a["answer_start"] for a in answers]}})
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such SQuAD file") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a SQuAD file ({type(e).__name__}: {e}); expected {{'version', 'data': "
                         "[{'title', 'paragraphs': [{'context', 'qas': [{'id', 'question', 'answers'}]}]}]}") from None
    return records


# --------------------------------------------------------------------------- the encoder's vocabulary
SPECIALS = ("[CLS]", "[SEP]", "[MASK]", "[PAD]")


class EncoderVocab:
    """The text encoder's ids: the SentencePiece pieces 0..n-1, then [CLS]=n, [SEP]=n+1, [MASK]=n+2, [PAD]=n+3."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.n_pieces = tokenizer.n_words
        self.cls_id, self.sep_id, self.mask_id, self.pad_id = range(self.n_pieces, self.n_pieces + len(SPECIALS))
        self.size = self.n_pieces + len(SPECIALS)

    def encode(self, text: str) -> list[int]:
        """The pieces of ``text`` (no special ids)."""
        return self.tokenizer.sp.encode(text)

    def encode_with_offsets(self, text: str) -> list[tuple[int, int, int]]:
        """[(id, begin, end)] with ``text[begin:end]`` the characters of each piece (its leading
        word-boundary space left out; a piece that is only that space has begin == end)."""
        out, position = [], 0
        for i in self.encode(text):
            piece = self.tokenizer.sp.id_to_piece(i)
            if i == self.tokenizer.unk_id:
                raise ValueError(f"EncoderVocab: the tokenizer does not know a character of {text!r}; "
                                 "use the tiny world's characters (plain English letters and punctuation)")
            word = piece.replace("\u2581", " ").lstrip(" ")
            while word and position < len(text) and text[position].isspace():
                position += 1
            if not text.startswith(word, position):
                raise ValueError(f"EncoderVocab: cannot align piece {piece!r} with {text!r} at character {position}")
            out.append((i, position, position + len(word)))
            position += len(word)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """The text of piece ids; special ids are dropped."""
        return self.tokenizer.decode([int(i) for i in ids if int(i) < self.n_pieces])

    def __repr__(self) -> str:
        return f"EncoderVocab(size={self.size}: {self.n_pieces} pieces + {', '.join(SPECIALS)})"


def tiny_world_vocab() -> EncoderVocab:
    """The vocabulary of the tiny world: its SentencePiece tokenizer (trained from the corpus in a
    few hundredths of a second; the same bytes as the tiny-world LLaMA's tokenizer.model) + specials."""
    recipe = Recipe()
    _, corpus, train, heldout = build_world(recipe)
    return EncoderVocab(train_tokenizer(corpus, train + heldout, recipe.vocab_size))


# --------------------------------------------------------------------------- encoding, loss, prediction
@dataclass
class QALayout:
    """Where everything of one record sits in its row: the context's tokens and their characters."""

    ids: list[int]
    context_start: int  # row position of the context's first token
    offsets: list[tuple[int, int]]  # character span of each context token
    start: int  # answer's first token (0 = [CLS]: no answer)
    end: int


def answer_token_span(offsets: Sequence[tuple[int, int]], char_start: int, char_end: int) -> tuple[int, int]:
    """(first, last) context token overlapping the characters [char_start, char_end)."""
    inside = [k for k, (b, e) in enumerate(offsets) if e > b and b < char_end and e > char_start]
    if not inside:
        raise ValueError(f"no token covers characters {char_start}..{char_end}")
    return inside[0], inside[-1]


def qa_layout(record: Mapping, vocab: EncoderVocab, max_len: int) -> QALayout:
    """[CLS] question [SEP] context [SEP] of one record, with the gold token span (first answer)."""
    question = vocab.encode(record["question"])
    pieces = vocab.encode_with_offsets(record["context"])
    ids = [vocab.cls_id, *question, vocab.sep_id, *(p for p, _, _ in pieces), vocab.sep_id]
    if len(ids) > max_len:
        raise ValueError(f"record {record['id']!r} needs {len(ids)} tokens ([CLS] question [SEP] context [SEP]) "
                         f"but max_len={max_len}; raise max_len (the encoder's max_seq_len bounds it)")
    offsets = [(b, e) for _, b, e in pieces]
    context_start = len(question) + 2
    start = end = 0
    texts = list(record["answers"]["text"])
    if texts:
        char_start = record["answers"]["answer_start"][0]
        char_end = char_start + len(texts[0])
        if record["context"][char_start:char_end] != texts[0]:
            raise ValueError(f"record {record['id']!r}: answer {texts[0]!r} is not at answer_start={char_start} "
                             f"of its context (found {record['context'][char_start:char_end]!r})")
        try:
            first, last = answer_token_span(offsets, char_start, char_end)
        except ValueError as e:
            raise ValueError(f"record {record['id']!r}: {e} of its context") from None
        start, end = context_start + first, context_start + last
    return QALayout(ids, context_start, offsets, start, end)


def encode_qa(records: Sequence[Mapping], vocab: EncoderVocab, max_len: int = QA_MAX_LEN) -> dict[str, torch.Tensor]:
    """Records -> {"tokens": (N, T) long, "mask": (N, T) bool (True = real token), "start": (N,),
    "end": (N,)} with T = max_len, rows ``[CLS] question [SEP] context [SEP] [PAD]...``; start/end
    are the first answer's first and last token (0, 0 for no answer). ``tuple(d.values())`` gives
    the four tensors in this order."""
    layouts = [qa_layout(r, vocab, max_len) for r in records]
    tokens = torch.full((len(records), max_len), vocab.pad_id, dtype=torch.long)
    mask = torch.zeros(len(records), max_len, dtype=torch.bool)
    for i, lay in enumerate(layouts):
        tokens[i, : len(lay.ids)] = torch.tensor(lay.ids)
        mask[i, : len(lay.ids)] = True
    start = torch.tensor([lay.start for lay in layouts], dtype=torch.long)
    end = torch.tensor([lay.end for lay in layouts], dtype=torch.long)
    return {"tokens": tokens, "mask": mask, "start": start, "end": end}


def qa_loss(logits: torch.Tensor, start: torch.Tensor, end: torch.Tensor,
            mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean of the start and end cross-entropies. logits (B, T, 2): start and end scores per token;
    start, end (B,) the gold positions; mask (B, T) True at real tokens (padding gets no probability)."""
    if logits.dim() != 3 or logits.shape[-1] != 2:
        raise ValueError(f"qa_loss: logits must be (batch, seq_len, 2), the start and end scores (give the "
                         f"encoder a span head with encoders.set_head(model, 2)); got {tuple(logits.shape)}")
    if mask is not None:
        logits = logits.masked_fill(~mask[..., None], float("-inf"))
    return (F.cross_entropy(logits[..., 0].float(), start) + F.cross_entropy(logits[..., 1].float(), end)) / 2


def best_span(start_scores: torch.Tensor, end_scores: torch.Tensor, n_context: int,
              max_answer_tokens: int) -> tuple[int, int, float]:
    """The context span (i, j), i <= j < i + max_answer_tokens, with the highest start_i + end_j.
    start_scores, end_scores (n_context,): the scores of the context tokens -> (i, j, score)."""
    scores = start_scores[:, None] + end_scores[None, :]  # (n, n): [i, j] = start_i + end_j
    i, j = torch.meshgrid(torch.arange(n_context), torch.arange(n_context), indexing="ij")
    allowed = (j >= i) & (j - i < max_answer_tokens)
    flat = scores.masked_fill(~allowed.to(scores.device), float("-inf")).flatten().argmax().item()
    i, j = divmod(flat, n_context)
    return i, j, scores[i, j].item()


@torch.no_grad()
def predict_spans(model: nn.Module, records: Sequence[Mapping], vocab: EncoderVocab, max_len: int = QA_MAX_LEN,
                  max_answer_tokens: int = 8, allow_empty: Optional[bool] = None,
                  batch_size: int = 64) -> dict[str, str]:
    """{id: predicted answer text} of a span model (``model(tokens, mask)`` -> (B, T, 2)).

    The answer is the context's characters under the best span (:func:`best_span`). allow_empty:
    answer "" when the null score (start and end at [CLS]) beats the best span, as for SQuAD v2.0;
    None -> True exactly when some record has no answer (a v2.0-style set); False (v1.1): always a span.
    """
    if allow_empty is None:
        allow_empty = any(not answer_texts(r) for r in records)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    layouts = [qa_layout(r, vocab, max_len) for r in records]
    encoded = encode_qa(records, vocab, max_len)
    predictions: dict[str, str] = {}
    try:
        for lo in range(0, len(records), batch_size):
            tokens = encoded["tokens"][lo: lo + batch_size].to(device)
            mask = encoded["mask"][lo: lo + batch_size].to(device)
            logits = model(tokens, mask).float().cpu()  # (B, T, 2)
            if logits.dim() != 3 or logits.shape[-1] != 2:
                raise ValueError(f"predict_spans: the model must give (batch, seq_len, 2) start/end scores; got "
                                 f"{tuple(logits.shape)} (give it a span head: encoders.set_head(model, 2))")
            for b, record in enumerate(records[lo: lo + batch_size]):
                lay = layouts[lo + b]
                n, c0 = len(lay.offsets), lay.context_start
                i, j, score = best_span(logits[b, c0: c0 + n, 0], logits[b, c0: c0 + n, 1], n, max_answer_tokens)
                null = (logits[b, 0, 0] + logits[b, 0, 1]).item()
                empty = allow_empty and null > score
                predictions[record["id"]] = "" if empty else record["context"][lay.offsets[i][0]: lay.offsets[j][1]]
    finally:
        model.train(was_training)
    return predictions


# --------------------------------------------------------------------------- masked-language modelling
def mask_tokens(tokens: torch.Tensor, vocab: EncoderVocab, generator: torch.Generator,
                prob: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """RoBERTa's masking: each piece (not a special id) is chosen with probability ``prob``; a
    chosen one becomes [MASK] (80%), a random piece (10%) or stays (10%). Returns (inputs, labels):
    labels hold the original id at chosen positions and -100 elsewhere (ignored by the loss)."""
    chosen = (torch.rand(tokens.shape, generator=generator) < prob) & (tokens < vocab.n_pieces)
    labels = torch.where(chosen, tokens, torch.full_like(tokens, -100))
    kind = torch.rand(tokens.shape, generator=generator)
    random_ids = torch.randint(3, vocab.n_pieces, tokens.shape, generator=generator)  # ids 0-2: unk, bos, eos
    inputs = torch.where(chosen & (kind < 0.8), torch.full_like(tokens, vocab.mask_id), tokens)
    inputs = torch.where(chosen & (kind >= 0.8) & (kind < 0.9), random_ids, inputs)
    return inputs, labels


def text_windows(corpus: Sequence[str], vocab: EncoderVocab, seq_len: int) -> torch.Tensor:
    """The documents as one stream ``doc [SEP] doc [SEP] ...`` cut into rows ``[CLS] + seq_len - 1
    tokens`` (the incomplete last row is dropped) -> (N, seq_len)."""
    stream: list[int] = []
    for doc in corpus:
        stream += vocab.encode(doc) + [vocab.sep_id]
    width = seq_len - 1
    rows = torch.tensor(stream[: len(stream) // width * width]).view(-1, width)
    return torch.cat([torch.full((rows.shape[0], 1), vocab.cls_id), rows], dim=1)


@torch.no_grad()
def mlm_accuracy(model: TextEncoder, windows: torch.Tensor, vocab: EncoderVocab, seed: int = 0,
                 prob: float = 0.15, batch_size: int = 64) -> dict:
    """How often the model restores the chosen tokens of ``windows`` (masked with a fixed seed),
    beside the majority baseline (always the most frequent chosen token)."""
    gen = torch.Generator().manual_seed(seed)
    inputs, labels = mask_tokens(windows, vocab, gen, prob)
    right = 0
    for lo in range(0, len(windows), batch_size):
        logits = model(inputs[lo: lo + batch_size].to(model.device)).cpu()
        chosen = labels[lo: lo + batch_size] != -100
        right += (logits.argmax(-1)[chosen] == labels[lo: lo + batch_size][chosen]).sum().item()
    targets = labels[labels != -100]
    majority = Counter(targets.tolist()).most_common(1)[0][1]
    return {"accuracy": right / len(targets), "majority_baseline": majority / len(targets), "tokens": len(targets)}


# --------------------------------------------------------------------------- the pretrained base
TEXT_BASE_VERSION = 1  # bump when the pretraining code changes what gets built


@dataclass(frozen=True)
class TextRecipe:
    """Everything that decides the pretrained text encoder; its hash (with the corpus) names the folder."""

    dim: int = 64
    n_layers: int = 4
    n_heads: int = 4
    mlp_hidden: int = 256
    seq_len: int = 64  # rows of the MLM data, and the encoder's max_seq_len (>= QA_MAX_LEN)
    steps: int = 1500
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    clip: float = 1.0
    mask_prob: float = 0.15
    heldout_passes: int = 4  # fresh phrasings of the world's facts, for the held-out MLM accuracy
    seed: int = 0


TEXT_RECIPE = TextRecipe()


def text_base_name(recipe: TextRecipe = TEXT_RECIPE) -> str:
    """``textenc-<12 hex>``: a hash of the recipe, the tiny world (its config, tokenizer size and
    corpus) and TEXT_BASE_VERSION; the same name in the package (``adapterlab/bases/``) and the cache."""
    world_recipe = Recipe()
    _, corpus, _, _ = build_world(world_recipe)
    blob = json.dumps({"recipe": asdict(recipe), "world": asdict(world_recipe.world),
                       "vocab_size": world_recipe.vocab_size, "corpus": corpus_hash(corpus),
                       "version": TEXT_BASE_VERSION}, sort_keys=True)
    return "textenc-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


def mlm_loss(model: TextEncoder, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Masked-language-model loss of a batch (inputs, labels) from :func:`mask_tokens`: cross-entropy
    on the chosen positions, with the head run only where it is scored."""
    inputs, labels = batch
    chosen = labels != -100  # (B, T)
    logits = model.head(model.hidden(inputs)[chosen])  # (n_chosen, vocab)
    return F.cross_entropy(logits, labels[chosen])


def pretrain_text_encoder(recipe: TextRecipe = TEXT_RECIPE, progress: bool = True, callbacks: Sequence = ()
                          ) -> tuple[TextEncoder, EncoderVocab, dict]:
    """Masked-language modelling on the tiny-world corpus -> (model, vocab, info), through the one
    training loop (:func:`adapterlab.train.train`, whose ``callbacks`` these are). Runs with torch's
    current thread count; :func:`build_text_base` calls it with ``files.BUILD_THREADS``."""
    world_recipe = Recipe()
    world, corpus, _, _ = build_world(world_recipe)
    vocab = tiny_world_vocab()
    windows = text_windows(corpus, vocab, recipe.seq_len)  # (N, T)
    heldout = text_windows(pretrain_corpus(world, passes=recipe.heldout_passes, seed=world.seed + 1000),
                           vocab, recipe.seq_len)
    config = TextEncoderConfig(vocab_size=vocab.size, max_seq_len=recipe.seq_len, dim=recipe.dim,
                               n_layers=recipe.n_layers, n_heads=recipe.n_heads, mlp_hidden=recipe.mlp_hidden)
    torch.manual_seed(recipe.seed)
    model = init_encoder_weights(TextEncoder(config), seed=recipe.seed).train()
    gen = torch.Generator().manual_seed(recipe.seed)

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.randint(0, len(windows), (recipe.batch_size,), generator=gen)
        return mask_tokens(windows[rows], vocab, gen, recipe.mask_prob)  # inputs, labels: (B, T) each

    tc = TrainConfig(steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr, warmup_steps=recipe.warmup_steps,
                     weight_decay=recipe.weight_decay, clip=recipe.clip, seed=recipe.seed, checkpoint=False,
                     log_every=1, progress=progress, desc="pretraining text encoder (MLM)")
    metrics = train(model, windows, tc, callbacks=callbacks, batch_fn=batch, loss_fn=mlm_loss)
    losses = [loss for _, loss in metrics["loss_history"]]  # every step's
    history = [[s, round(loss, 4)] for s, loss in enumerate(losses) if s % 25 == 0 or s == recipe.steps - 1]
    model.eval()
    info = {"loss_history": history, "final_loss": history[-1][1], "train_seconds": round(metrics["train_seconds"], 1),
            "corpus_windows": len(windows), "heldout_windows": len(heldout), "params": model.num_params(),
            "heldout_mlm": mlm_accuracy(model, heldout, vocab, seed=recipe.seed, prob=recipe.mask_prob)}
    return model, vocab, info


def build_text_base(progress: bool = True, force: bool = False, recipe: TextRecipe = TEXT_RECIPE) -> Path:
    """Make sure the text encoder base exists; return its folder: the shipped one
    (``files.shipped_base``), else ``cache_root()/text_base_name()``, pretrained there on first use
    under a file lock (concurrent callers wait; the folder appears complete or not at all), with
    ``files.BUILD_THREADS`` threads and fixed seeds. force=True: build anew into the cache.

    The folder: model.safetensors and config.json (:func:`adapterlab.encoders.transformer.save_encoder`, the MLM
    head included), tokenizer.model, and textbase.json (the recipe, the loss history, the held-out
    MLM accuracy beside the majority baseline, and the machine it was built on).
    """
    name = text_base_name(recipe)

    def build(folder: Path) -> None:
        t0 = time.perf_counter()
        model, vocab, info = pretrain_text_encoder(recipe, progress=progress)
        info = {"recipe": asdict(recipe), "version": TEXT_BASE_VERSION, "key": name, **info,
                "pretrain_seconds": round(time.perf_counter() - t0, 1), "built_with": build_machine()}
        save_encoder(model, folder)
        vocab.tokenizer.save(folder / "tokenizer.model")
        atomic_write_text(folder / "textbase.json", json.dumps(info, indent=1))

    announce = ("Building the text-encoder base (first use only, about 2 minutes on one CPU thread) into {folder}"
                if progress else None)
    return base_folder(name, "textbase.json", build, force=force, announce=announce)


def load_text_base(device=None, progress: bool = True, recipe: TextRecipe = TEXT_RECIPE) -> TextEncoder:
    """The pretrained text encoder (MLM head), frozen (requires_grad False), in eval mode, with
    ``model.vocab`` (:class:`EncoderVocab`) attached; built on first use (:func:`build_text_base`).
    For question answering give it a span head: ``encoders.set_head(model, 2)``."""
    folder = build_text_base(progress=progress, recipe=recipe)
    model = load_encoder(folder, device=device or "cpu").requires_grad_(False)
    model.vocab = EncoderVocab(Tokenizer(folder / "tokenizer.model"))
    return model


def text_base_info(recipe: TextRecipe = TEXT_RECIPE) -> dict:
    """What textbase.json of the (built or shipped) base says: recipe, losses, held-out MLM accuracy."""
    return json.loads((build_text_base(progress=False, recipe=recipe) / "textbase.json").read_text())


__all__ = [
    "VERSIONS", "SPLIT_SIZES", "QA_MAX_LEN", "make_split", "make_squad", "save_squad_json", "load_squad_json",
    "EncoderVocab", "tiny_world_vocab", "encode_qa", "qa_loss", "best_span", "predict_spans", "mask_tokens",
    "text_windows", "mlm_loss", "mlm_accuracy", "TextRecipe", "TEXT_RECIPE", "text_base_name", "pretrain_text_encoder",
    "build_text_base", "load_text_base", "text_base_info",
]
