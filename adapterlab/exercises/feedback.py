"""What every checker shares: the result a notebook shows, and the helpers that read an answer and name a mistake.

A checker returns a :class:`CheckResult`: truthy when the answer is right, shown in Jupyter as a short
message ("Correct! ...", "Not yet: ...", "No answer yet: ..."). A wrong answer is compared with the
mistakes people actually make, so the message names the likely mistake instead of just saying "wrong".
Checkers never raise on a blank or broken answer: a notebook whose exercise is still blank runs top to
bottom (that is how nbval runs it in CI).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch


# --------------------------------------------------------------------------- the result
@dataclass
class CheckResult:
    """Outcome of a check: ``bool(result)`` says if it passed; ``repr`` is the feedback."""

    correct: bool
    message: str

    def __bool__(self) -> bool:
        return self.correct

    def __repr__(self) -> str:
        return self.message


def _ok(message: str) -> CheckResult:
    return CheckResult(True, "Correct! " + message)


def _no(message: str) -> CheckResult:
    return CheckResult(False, "Not yet: " + message)


def _missing(what: str) -> CheckResult:
    return CheckResult(False, f"No answer yet: replace the placeholder with {what}, then run the cell again.")


def _is_blank(answer) -> bool:
    return answer is None or answer is Ellipsis


# --------------------------------------------------------------------------- reading an answer
def _one_number(answer, what: str):
    """A tensor, numpy array or numpy scalar holding one number -> that Python number (else a CheckResult)."""
    if isinstance(answer, (torch.Tensor, np.ndarray)):
        if answer.shape != () and math.prod(answer.shape) != 1:
            return _no(f"{what} should be one number; got an array of shape {tuple(answer.shape)}.")
        return answer.item()
    if isinstance(answer, np.generic):  # np.int64 from .argmax(), np.float32 from a mean
        return answer.item()
    return answer


def _as_int(answer, what: str) -> tuple[Optional[int], Optional[CheckResult]]:
    """Turn a numeric answer into an int, or explain why it cannot be one."""
    if isinstance(answer, (bool, np.bool_)):
        return None, _no(f"{what} should be a whole number, not {answer!r}.")
    if isinstance(answer, str):
        try:
            answer = float(answer.replace(",", "").replace("_", ""))
        except ValueError:
            return None, _no(f"{what} should be a number; got the text {answer!r}.")
    answer = _one_number(answer, what)
    if isinstance(answer, CheckResult):
        return None, answer
    if not isinstance(answer, (int, float)) or isinstance(answer, bool):
        return None, _no(f"{what} should be a number; got {type(answer).__name__}.")
    if isinstance(answer, float) and not answer.is_integer():
        return None, _no(f"{what} is a whole number; got {answer!r}. Give the exact count, not a rounded value.")
    return int(answer), None


def _as_float(answer, what: str) -> tuple[Optional[float], Optional[CheckResult]]:
    """Turn a numeric answer into a float, or explain why it cannot be one."""
    if isinstance(answer, (bool, np.bool_)):
        return None, _no(f"{what} should be a number, not {answer!r}.")
    answer = _one_number(answer, what)
    if isinstance(answer, CheckResult):
        return None, answer
    if isinstance(answer, str):
        try:
            answer = float(answer)
        except ValueError:
            return None, _no(f"{what} should be a number; got the text {answer!r}.")
    if not isinstance(answer, (int, float)) or isinstance(answer, bool):
        return None, _no(f"{what} should be a number; got {type(answer).__name__}.")
    return float(answer), None


# --------------------------------------------------------------------------- naming the mistake
def _named_mistake(answer: int, expected: int, mistakes: list[tuple[int, str]],
                   shown: Optional[str] = None) -> Optional[CheckResult]:
    """The feedback naming every known mistake that gives ``answer`` (None when none does).
    A "mistake" that happens to equal the truth is ignored."""
    matched = [message for value, message in mistakes if value == answer and value != expected]
    if not matched:
        return None
    return _no(f"{answer if shown is None else shown} " + " Or it ".join(matched))


def _check_count(answer: int, expected: int, mistakes: list[tuple[int, str]], what: str, why: str) -> CheckResult:
    """Compare an integer answer with the expected one and with known wrong answers.

    ``mistakes``: (wrong value, what it means) pairs; different mistakes that give the same
    number are all named, and a "mistake" that happens to equal the truth is ignored.
    """
    if answer == expected:
        return _ok(why)
    named = _named_mistake(answer, expected, mistakes, shown=f"{answer:,}")
    if named is not None:
        return named
    rel = abs(answer - expected) / expected
    if rel < 0.01:
        return _no(f"{answer:,} is within 1% of {what} but not exact (off by {answer - expected:+,}). "
                   "Look for a small term: norms, gates, or a rounding of the feed-forward width.")
    if rel < 0.5:
        return _no(f"{answer:,} is off by {100 * (answer - expected) / expected:+.1f}%. "
                   "Write the count term by term and compare each with the model's parameters.")
    return _no(f"{answer:,} is far from {what} (off by a factor {answer / expected:.3g}). "
               "Check which dimensions multiply in each term.")


# --------------------------------------------------------------------------- a function as the answer
def _call(fn: Callable, args: tuple, name: str) -> tuple[Optional[torch.Tensor], Optional[CheckResult]]:
    """Run the student's function; turn an exception into feedback."""
    try:
        out = fn(*args)
    except Exception as e:  # the student's code: report whatever went wrong
        return None, _no(f"calling {name} raised {type(e).__name__}: {e}")
    if out is None:
        return None, _no(f"{name} returned None: compute the result and `return` it.")
    if not isinstance(out, torch.Tensor):
        return None, _no(f"{name} should return a torch.Tensor; it returned {type(out).__name__}.")
    return out, None


def _same(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> bool:
    """Same shape and the same values up to ``tol``."""
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=tol, atol=tol)


def _diagnose(out: torch.Tensor, expected: torch.Tensor, mistakes: dict[str, torch.Tensor], name: str) -> CheckResult:
    """Feedback on a wrong output: the wrong shape, the known mistake it equals, or how far off it is."""
    if out.shape != expected.shape:
        return _no(f"{name} returned shape {tuple(out.shape)}; expected {tuple(expected.shape)}.")
    for message, wrong in mistakes.items():
        if _same(out, wrong):
            return _no(message)
    err = (out.float() - expected.float()).abs().max().item()
    return _no(f"{name} returns the right shape but the wrong values (largest difference {err:.3g}). "
               "Go through the formula one step at a time on a tiny input.")
