"""Checker for notebook 08 (several GPUs): gradient-accumulation steps per rank for a global batch."""
from __future__ import annotations

import math

from .feedback import CheckResult, _ok, _no, _missing, _is_blank, _as_int, _named_mistake


def check_accumulation_steps(answer, global_batch: int = 64, world_size: int = 8, micro_batch: int = 4) -> CheckResult:
    """Exercise: gradient-accumulation steps per optimizer step on each rank = global / world / micro."""
    if _is_blank(answer):
        return _missing("an integer")
    n, err = _as_int(answer, "the number of accumulation steps")
    if err is not None:
        return err
    per_rank = global_batch // world_size
    expected = math.ceil(per_rank / micro_batch)
    if n == expected:
        return _ok(f"each of the {world_size} ranks takes {global_batch} / {world_size} = {per_rank} examples of every "
                   f"global batch, {micro_batch} per forward pass: {expected} micro-batches, then one all-reduce "
                   "and one optimizer step, the same update as one process with the whole batch.")
    mistakes = [
        (math.ceil(global_batch / micro_batch), f"splits the whole global batch of {global_batch} on every rank; each "
                                                 f"rank only takes its share, {global_batch} / {world_size} = {per_rank}."),
        (per_rank, f"is the number of examples per rank ({per_rank}), not of micro-batches of {micro_batch}."),
        (world_size, "is the number of ranks; accumulation happens within each rank."),
        (global_batch // (world_size * micro_batch) * world_size, "counts micro-batches over all ranks; the question "
                                                                  "asks per rank."),
    ]
    named = _named_mistake(n, expected, mistakes)
    if named is not None:
        return named
    return _no(f"{n} is not it: how many examples of one global batch does one rank get, and how many forward "
               "passes of micro_batch examples does that take?")
