"""Instruction data: Alpaca records, the prompt templates, label masking and batching.

An Alpaca file is a JSON list of records ``{"instruction": str, "input": str, "output": str}``
(about 40% of Alpaca-52K has a non-empty input). Each record becomes one training example

    tokens = [BOS] + encode(prompt) + encode(output) + [EOS]
    labels = [-100] * (1 + len(prompt))  + encode(output) + [EOS]

so the loss is computed on the response only (PAPER.md, "Alpaca data format"); -100 is the
label torch's cross-entropy ignores (not token 0, which is a real token, <unk>). Prompt and
response are encoded separately, so the boundary between them is exact and generation (which
encodes the prompt alone and continues it) sees the same tokens as training.

Batches are grouped by length instead of padding every example to 512 tokens as the release
does: examples of similar length share a batch, so little compute goes to padding.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

IGNORE_INDEX = -100  # label value ignored by the loss (torch's cross_entropy default)

# The exact templates of the Alpaca release (PAPER.md).
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)

REQUIRED_FIELDS = ("instruction", "output")  # "input" may be missing: treated as ""
TEXT_FIELDS = ("instruction", "input", "output")


class DataError(ValueError):
    """A data file or record is not usable; the message says where and what to do."""


def format_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt for one record: the with-input template when ``input`` is non-empty."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


# --------------------------------------------------------------------------- loading + validation
def validate_records(records: Any, source: str = "records", max_problems: int = 5) -> list[dict]:
    """Check a whole list of Alpaca records; return them or raise DataError listing the problems.

    Every record is checked before anything is returned, so training never starts on a
    partially valid file.
    """
    if not isinstance(records, list):
        raise DataError(
            f"{source}: expected a JSON list of records like "
            f'[{{"instruction": "...", "input": "...", "output": "..."}}], found a {type(records).__name__}'
        )
    if not records:
        raise DataError(f"{source}: the list of records is empty; add at least one record")
    problems: list[str] = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            problems.append(f"record {i}: expected an object with instruction/input/output, found {type(rec).__name__}")
            continue
        for name in REQUIRED_FIELDS:
            if name not in rec:
                problems.append(f"record {i}: missing field {name!r} (has {sorted(rec)})")
        for name in TEXT_FIELDS:
            if name in rec and not isinstance(rec[name], str):
                problems.append(
                    f"record {i}: field {name!r} must be a string, found {type(rec[name]).__name__} {rec[name]!r:.40}"
                )
    if problems:
        shown = "\n  ".join(problems[:max_problems])
        more = f"\n  ... and {len(problems) - max_problems} more problems" if len(problems) > max_problems else ""
        n_bad = len({p.split(":")[0] for p in problems})
        raise DataError(f"{source}: {n_bad} of {len(records)} records are invalid (nothing was trained):\n  {shown}{more}")
    return [{"input": "", **r} for r in records]  # extra fields (e.g. "answer") are kept


def load_alpaca(path: str | os.PathLike) -> list[dict]:
    """Read and validate an Alpaca JSON file (a list of records; ``.jsonl``: one record per line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass an Alpaca JSON file (a list of instruction/input/output records)")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"{path}: the file is empty; expected a JSON list of instruction/input/output records")
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno} is not valid JSON ({e.msg} at column {e.colno})") from None
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); an Alpaca file is a "
                f"JSON list of records (use a .jsonl name for one record per line)"
            ) from None
    return validate_records(records, source=str(path))


def save_alpaca(records: Sequence[dict], path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(list(records), indent=1, ensure_ascii=False), encoding="utf-8")


# --------------------------------------------------------------------------- tokenising
def encode_example(tokenizer, record: dict, max_seq_len: int) -> tuple[list[int], list[int], bool]:
    """One record -> (tokens, labels, truncated). Labels are IGNORE_INDEX on BOS and the prompt."""
    prompt = tokenizer.encode(format_prompt(record["instruction"], record.get("input", "")), bos=True, eos=False)
    response = tokenizer.encode(record["output"], bos=False, eos=True)
    tokens = prompt + response
    labels = [IGNORE_INDEX] * len(prompt) + response
    truncated = len(tokens) > max_seq_len
    return tokens[:max_seq_len], labels[:max_seq_len], truncated


@dataclass
class TokenDataset:
    """Examples as (tokens, labels) lists of equal length; labels are the tokens, with
    IGNORE_INDEX where no loss is taken. Position t predicts labels[t + 1]
    (see :func:`adapterlab.train.loss_sum`).
    """

    tokens: list[list[int]]
    labels: list[list[int]]
    n_truncated: int = 0
    n_dropped: int = 0
    source: str = ""
    records: list[dict] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> tuple[list[int], list[int]]:
        return self.tokens[i], self.labels[i]

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.tokens]

    def n_targets(self, indices: Sequence[int]) -> int:
        """How many labels count in the loss for these examples (after the shift)."""
        return sum(sum(1 for x in self.labels[i][1:] if x != IGNORE_INDEX) for i in indices)

    def summary(self) -> str:
        lens = self.lengths
        text = f"{len(self)} examples from {self.source or 'memory'}, lengths {min(lens)}..{max(lens)} tokens"
        if self.n_truncated:
            text += f", {self.n_truncated} truncated to max_seq_len"
        if self.n_dropped:
            text += f", {self.n_dropped} dropped (no response token left after truncation)"
        return text


def instruction_dataset(records: Sequence[dict], tokenizer, max_seq_len: int = 512, source: str = "") -> TokenDataset:
    """Tokenise validated Alpaca records; truncation at ``max_seq_len`` is counted and reported."""
    records = validate_records(list(records), source or "records")
    toks, labs, kept = [], [], []
    n_trunc = n_drop = 0
    for rec in records:
        t, l, truncated = encode_example(tokenizer, rec, max_seq_len)
        n_trunc += truncated
        if all(x == IGNORE_INDEX for x in l[1:]):  # the prompt filled the window: nothing to learn
            n_drop += 1
            continue
        toks.append(t)
        labs.append(l)
        kept.append(rec)
    if not toks:
        raise DataError(
            f"{source or 'records'}: every example was longer than max_seq_len={max_seq_len} before its response; "
            "raise max_seq_len"
        )
    return TokenDataset(toks, labs, n_trunc, n_drop, source, kept)


def text_windows(token_stream: Sequence[int], seq_len: int, source: str = "") -> TokenDataset:
    """Pretraining: cut one long token stream into non-overlapping windows, every token a target."""
    n = len(token_stream) // seq_len
    if n == 0:
        raise DataError(f"{source or 'corpus'}: {len(token_stream)} tokens is less than one window of {seq_len}")
    windows = [list(token_stream[i * seq_len:(i + 1) * seq_len]) for i in range(n)]
    return TokenDataset(windows, [list(w) for w in windows], source=source)


# --------------------------------------------------------------------------- batching
def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group: int = 8
) -> list[list[int]]:
    """One epoch's batches of example indices, deterministic for (seed, epoch).

    Shuffle, take ``group`` batches' worth of examples at a time, sort those by length and cut
    them into batches, then shuffle the batch order. Every batch holds exactly ``batch_size``
    examples (the last incomplete one is dropped, a different remainder every epoch), so a
    global batch can be split evenly across gradient-accumulation steps and ranks.
    """
    n = len(lengths)
    if batch_size > n:
        raise DataError(f"batch size {batch_size} is larger than the data set ({n} examples); lower --batch-size")
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    n_used = (n // batch_size) * batch_size
    order = order[:n_used]
    batches = []
    chunk = batch_size * group
    for start in range(0, n_used, chunk):
        part = sorted(order[start:start + chunk], key=lambda i: lengths[i])
        batches += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in perm]


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    return n_examples // batch_size


class StepSampler:
    """Which examples step ``s`` trains on: global batch s of the length-grouped order.

    Every process computes the same global batches (a pure function of seed and step) and
    keeps its share ``batch[rank::world_size]``; the share is cut into micro-batches of
    ``micro_batch`` examples (gradient accumulation). The position in the data is just the
    global step, so a checkpoint needs to store nothing else.
    """

    def __init__(self, lengths: Sequence[int], global_batch: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, micro_batch: Optional[int] = None, group: int = 8):
        if global_batch % world_size:
            raise DataError(f"the global batch size {global_batch} is not divisible by the number of processes "
                            f"{world_size}; choose a multiple of {world_size}")
        self.lengths = list(lengths)
        self.global_batch_size = global_batch
        self.seed, self.rank, self.world_size, self.group = seed, rank, world_size, group
        self.per_rank = global_batch // world_size
        self.micro_batch = micro_batch or self.per_rank
        self.steps_per_epoch = steps_per_epoch(len(self.lengths), global_batch)
        if self.steps_per_epoch < 1:
            raise DataError(f"the data set has {len(self.lengths)} examples, fewer than one global batch of "
                            f"{global_batch}; lower --batch-size or add data")
        self._epoch, self._batches = -1, []

    def global_batch(self, step: int) -> list[int]:
        """Example indices of global batch ``step`` (0-based, counted over all epochs)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._batches = length_grouped_batches(self.lengths, self.global_batch_size, self.seed, epoch, self.group)
            self._epoch = epoch
        return self._batches[index]

    def micro_batches(self, step: int) -> list[list[int]]:
        """This process's share of step ``step``, cut into micro-batches."""
        share = self.global_batch(step)[self.rank::self.world_size]
        return [share[i:i + self.micro_batch] for i in range(0, len(share), self.micro_batch)]


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example -> tokens (B, T), labels (B, T) with IGNORE_INDEX on padding.

    Right padding is harmless with causal attention: real tokens never look at later positions.
    """
    T = max(len(t) for t, _ in examples)
    tokens = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for b, (t, l) in enumerate(examples):
        tokens[b, : len(t)] = torch.tensor(t, dtype=torch.long)
        labels[b, : len(l)] = torch.tensor(l, dtype=torch.long)
    return tokens, labels


def load_instruction_data(spec: str, world=None) -> list[dict]:
    """``"tinyworld"`` -> the tiny world's training records; anything else -> an Alpaca file path."""
    if spec == "tinyworld":
        from .tinyworld import instruction_set, make_world

        return instruction_set(world if world is not None else make_world())[0]
    return load_alpaca(spec)


__all__ = [
    "IGNORE_INDEX", "PROMPT_WITH_INPUT", "PROMPT_NO_INPUT", "DataError", "format_prompt", "validate_records",
    "load_alpaca", "save_alpaca", "encode_example", "TokenDataset", "instruction_dataset", "text_windows",
    "length_grouped_batches", "collate", "StepSampler", "load_instruction_data", "steps_per_epoch",
]
