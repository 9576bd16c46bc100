"""Instruction data: Alpaca records, the prompt templates, label masking and batching.

The loss is in :mod:`adapterlab.losses`, the loop that batches these examples in :mod:`adapterlab.train`.

An Alpaca file is a JSON list of records ``{"instruction": str, "input": str, "output": str}``
(about 40% of Alpaca-52K has a non-empty input). Each record becomes one training example

    tokens = [BOS] + encode(prompt) + encode(output) + [EOS]
    labels = [-100] * (1 + len(prompt))  + encode(output) + [EOS]

so the loss is computed on the response only (docs/method.md, "templates"); -100 is the
label torch's cross-entropy ignores (not token 0, which is a real token, <unk>). Prompt and
response are encoded separately, so the boundary between them is exact and generation (which
encodes the prompt alone and continues it) sees the same tokens as training.

Batches are grouped by length instead of padding every example to 512 tokens as the release
does: examples of similar length share a batch, so little compute goes to padding. An example
may carry extra inputs of the model (``TokenDataset.forward_args``, e.g. image features for the
multi-modal adapter); :func:`get_batch` batches them with the tokens.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

IGNORE_INDEX = -100  # label value ignored by the loss (torch's cross_entropy default)

# The exact templates of the Alpaca release (docs/method.md).
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


class BatchSizeError(DataError):
    """The global batch does not fit the data set, or cannot be split evenly over the processes."""


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
def alpaca_prompt(tokenizer, record: dict) -> list[int]:
    """The prompt's ids: BOS and the Alpaca template around the instruction (and input)."""
    return tokenizer.encode(format_prompt(record["instruction"], record.get("input", "")), bos=True, eos=False)


def encode_example(tokenizer, record: dict, max_seq_len: Optional[int],
                   prompt_of: Callable = alpaca_prompt) -> tuple[list[int], list[int], bool]:
    """One record -> (tokens, labels, truncated). Labels are IGNORE_INDEX on the prompt
    (``prompt_of(tokenizer, record)``: the Alpaca template by default, a chat template for chat models).
    max_seq_len None: never cut."""
    prompt = prompt_of(tokenizer, record)
    response = tokenizer.encode(record["output"], bos=False, eos=True)
    tokens = prompt + response
    labels = [IGNORE_INDEX] * len(prompt) + response
    truncated = max_seq_len is not None and len(tokens) > max_seq_len
    return tokens[:max_seq_len], labels[:max_seq_len], truncated


@dataclass
class TokenDataset:
    """Examples as (tokens, labels) lists of equal length; labels are the tokens, with
    IGNORE_INDEX where no loss is taken. Position t predicts labels[t + 1]
    (see :func:`adapterlab.losses.loss_sum`).

    forward_args: extra inputs of the model, one row per example, passed by the training loop
    as ``model(tokens, **forward_args_of(batch))``: e.g. ``{"image_features": (N, visual_dim)}``
    for the multi-modal adapter. Empty for text.
    """

    tokens: list[list[int]]
    labels: list[list[int]]
    n_truncated: int = 0
    n_dropped: int = 0
    source: str = ""
    records: list[dict] = field(default_factory=list, repr=False)
    forward_args: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name, rows in self.forward_args.items():
            if not isinstance(rows, torch.Tensor) or rows.dim() == 0 or len(rows) != len(self.tokens):
                shape = tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__
                raise DataError(f"TokenDataset.forward_args[{name!r}] must be a tensor with one row per example "
                                f"({len(self.tokens)} rows); got {shape}")

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> tuple[list[int], list[int]]:
        return self.tokens[i], self.labels[i]

    def forward_args_of(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The extra model inputs of these examples, stacked: {name: (len(indices), ...)}; {} for text."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return {name: rows[index] for name, rows in self.forward_args.items()}

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


def instruction_dataset(records: Sequence[dict], tokenizer, max_seq_len: Optional[int] = 512, source: str = "",
                        prompt_of: Callable = alpaca_prompt) -> TokenDataset:
    """Tokenise validated Alpaca records; truncation at ``max_seq_len`` is counted and reported.
    prompt_of: the prompt's ids of a record (see :func:`encode_example`)."""
    records = validate_records(list(records), source or "records")
    toks, labs, kept = [], [], []
    n_trunc = n_drop = 0
    for rec in records:
        t, l, truncated = encode_example(tokenizer, rec, max_seq_len, prompt_of)
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
    check_batch_sizes(batch_size, n_examples=n)
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


def check_batch_sizes(global_batch: int, world_size: int = 1, micro_batch: Optional[int] = None,
                      n_examples: Optional[int] = None) -> tuple[int, int]:
    """-> (examples per rank per step, micro-batches per rank per step). Raises :class:`BatchSizeError`.

    Every rank must get the same number of examples, so the global batch must be divisible by
    the world size (the number of processes). A rank's share is then cut into micro-batches of
    ``micro_batch`` examples (gradient accumulation); the last one may be smaller - the loss is
    normalised by the number of targets in the whole global batch, so the update is the same
    however the batch is cut. n_examples: the data set must hold at least one global batch.
    """
    if global_batch < 1 or world_size < 1:
        raise BatchSizeError(f"global batch ({global_batch}) and world size ({world_size}) must be >= 1")
    if micro_batch is not None and micro_batch < 1:
        raise BatchSizeError(f"micro-batch size must be >= 1; got {micro_batch}")
    if global_batch % world_size:
        lower = (global_batch // world_size) * world_size
        options = f"--batch-size {lower} or {lower + world_size}" if lower else f"--batch-size {world_size}"
        raise BatchSizeError(
            f"the global batch size {global_batch} is not divisible by the world size {world_size} (the number of "
            f"processes): every rank must get the same number of examples. Use {options}, or start a number of "
            f"processes that divides {global_batch}."
        )
    if n_examples is not None and n_examples < global_batch:
        raise BatchSizeError(f"the data set has {n_examples} examples, fewer than one global batch of "
                             f"{global_batch}; lower --batch-size or add data")
    per_rank = global_batch // world_size
    return per_rank, math.ceil(per_rank / (micro_batch or per_rank))


class StepSampler:
    """Which examples step ``s`` trains on: global batch s of the length-grouped order.

    Every process computes the same global batches (a pure function of seed and step) and
    keeps its share ``batch[rank::world_size]``: length-grouped batches are sorted by length, so
    striding gives every rank a similar mix of lengths (similar compute) where contiguous slices
    would give rank 0 the short ones. The share is cut into micro-batches of ``micro_batch``
    examples (gradient accumulation). The position in the data is just the global step (samples
    seen = step * global batch), so a checkpoint needs to store nothing else, and a run written
    by 8 processes resumes on 1 and the other way round.
    """

    def __init__(self, lengths: Sequence[int], global_batch: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, micro_batch: Optional[int] = None, group: int = 8):
        if not 0 <= rank < world_size:
            raise BatchSizeError(f"rank {rank} is outside 0..{world_size - 1}")
        self.per_rank, self.accumulation = check_batch_sizes(global_batch, world_size, micro_batch, len(lengths))
        self.lengths = list(lengths)
        self.global_batch_size = global_batch
        self.seed, self.rank, self.world_size, self.group = seed, rank, world_size, group
        self.micro_batch = micro_batch or self.per_rank
        self.steps_per_epoch = steps_per_epoch(len(self.lengths), global_batch)
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

    def position(self, step: int) -> dict:
        """World-size independent position after ``step`` global steps (what a checkpoint stores)."""
        epoch, batch = divmod(step, self.steps_per_epoch)
        return {"global_step": step, "samples_seen": step * self.global_batch_size, "epoch": epoch,
                "batch_in_epoch": batch, "global_batch": self.global_batch_size, "seed": self.seed}


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


def get_batch(data: TokenDataset, indices: Sequence[int], device: Optional[torch.device] = None
              ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The examples ``indices`` of ``data`` as model inputs on ``device``: tokens (B, T), labels (B, T)
    (:func:`collate`) and the extra model inputs ``{name: (B, ...)}`` (:meth:`TokenDataset.forward_args_of`).

        tokens, labels, forward_args = get_batch(data, [0, 1, 2])
        loss = loss_sum(model, tokens, labels, **forward_args)
    """
    tokens, labels = collate([data[i] for i in indices])
    forward_args = {name: x.to(device) for name, x in data.forward_args_of(indices).items()}
    return tokens.to(device), labels.to(device), forward_args


__all__ = [
    "IGNORE_INDEX", "PROMPT_WITH_INPUT", "PROMPT_NO_INPUT", "DataError", "BatchSizeError", "check_batch_sizes",
    "format_prompt", "validate_records",
    "load_alpaca", "save_alpaca", "encode_example", "TokenDataset", "instruction_dataset", "text_windows",
    "length_grouped_batches", "collate", "get_batch", "StepSampler", "steps_per_epoch",
]
