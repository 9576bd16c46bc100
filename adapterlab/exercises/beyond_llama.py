"""Checker for notebook 11 (beyond LLaMA): the SQuAD F1 of an answer, scored by ``metrics.squad``;
the usual slips (no normalisation, words as a set, precision or recall alone, the first reference
only, ...) are recomputed here to be named.
"""
from __future__ import annotations

import string
from collections import Counter
from typing import Iterable

from ..metrics.squad import answer_tokens, normalize_answer, score_question
from .feedback import CheckResult, _ok, _no, _missing, _is_blank, _as_float


F1_PREDICTION = "the old red boat, the red one"  # the exercise's prediction and reference answers
F1_REFERENCES = ("The old boat in the harbour", "a red boat")


def _shared_words(pred: list, ref: list) -> int:
    """Words in both answers, as a bag: each counts min(times in pred, times in ref) times."""
    return sum((Counter(pred) & Counter(ref)).values())


def _bag_f1(pred: list, ref: list, count: str = "bag", score: str = "f1") -> float:
    """Token F1 (or one of the usual slips: count "set" / "each", score "precision" / "recall" / "mean")."""
    if not pred or not ref:
        return float(pred == ref)
    if count == "set":
        pred, ref = sorted(set(pred)), sorted(set(ref))
    shared = sum(w in ref for w in pred) if count == "each" else _shared_words(pred, ref)  # "each": repeats included
    if shared == 0:
        return 0.0
    p, r = shared / len(pred), shared / len(ref)
    return {"f1": 2 * p * r / (p + r), "precision": p, "recall": r, "mean": (p + r) / 2}[score]


def check_squad_f1(answer, prediction: str = F1_PREDICTION, references: Iterable[str] = F1_REFERENCES) -> CheckResult:
    """Exercise: the SQuAD F1 of ``prediction`` against a question's ``references`` (a fraction in
    [0, 1]; a percentage is accepted too): normalise, count shared words as a bag, F1 = 2PR / (P + R),
    the best over the references; no references (v2.0's no answer): 1 if the prediction is empty, else 0."""
    if _is_blank(answer):
        return _missing("a number between 0 and 1 (the F1 score)")
    value, err = _as_float(answer, "the F1 score")
    if err is not None:
        return err
    refs = [r for r in references if normalize_answer(r)] or [""]
    expected = score_question(prediction, refs)[1]
    pred = answer_tokens(prediction)
    close = lambda a, b: abs(a - b) < 0.005  # noqa: E731 (answers rounded to two or three decimals pass)
    if close(value, expected) or (value > 1 and close(value / 100, expected)):
        if refs == [""]:
            why = "No reference answer: F1 is 1 exactly when the prediction is empty after normalisation, else 0."
        else:
            steps = []
            for r in refs:
                ref = answer_tokens(r)
                shared = _shared_words(pred, ref)
                steps.append(f"against {' '.join(ref)!r}: {shared} shared, P = {shared}/{len(pred)}, "
                             f"R = {shared}/{len(ref)}, F1 = {_bag_f1(pred, ref):.3f}")
            why = (f"The prediction normalises to {' '.join(pred)!r} ({len(pred)} words); " + "; ".join(steps)
                   + f"; the best over the references: {expected:.3f}.")
        return _ok(why)

    raw, lower = (lambda t: t.split()), (lambda t: t.lower().split())
    keep_articles = lambda t: "".join(c for c in t.lower() if c not in string.punctuation).split()  # noqa: E731
    best = lambda words, **kw: max(_bag_f1(words(prediction), words(r), **kw) for r in refs)  # noqa: E731
    mistakes = [
        (best(raw), "compares the words as they are written. SQuAD normalises both answers first: lower case, "
                    "no punctuation, no articles (a, an, the), single spaces - so 'boat,' and 'boat' are one word."),
        (best(lower), "lower-cases but keeps the punctuation and the articles: 'boat,' is not 'boat' until the "
                      "punctuation goes. Normalise fully (adapterlab.metrics.squad.normalize_answer)."),
        (best(keep_articles), "keeps the articles: the normalisation drops a, an and the, so 'the' is never a "
                              "shared word."),
        (_bag_f1(pred, answer_tokens(refs[0])), "scores against the first reference only; a question scores the "
                                                "best over all its reference answers."),
        (sum(_bag_f1(pred, answer_tokens(r)) for r in refs) / len(refs),
         "averages over the references; SQuAD takes the best (the maximum) of them."),
        (best(answer_tokens, count="set"), "counts each distinct word once. F1 counts words as a bag: a word the "
                                           "prediction repeats counts min(times in prediction, times in reference) times."),
        (best(answer_tokens, count="each"), "counts every predicted word that occurs in the reference, repeats "
                                            "included; a shared word counts at most as often as the reference has "
                                            "it: min(times in prediction, times in reference)."),
        (best(answer_tokens, score="precision"), "is the precision (shared / predicted words); F1 also needs the "
                                                 "recall (shared / reference words): 2PR / (P + R)."),
        (best(answer_tokens, score="recall"), "is the recall (shared / reference words); F1 also needs the "
                                              "precision (shared / predicted words): 2PR / (P + R)."),
        (best(answer_tokens, score="mean"), "averages precision and recall; F1 is their harmonic mean, 2PR / (P + R)."),
        (score_question(prediction, refs)[0], "is the exact match (EM); F1 gives partial credit for the shared words."),
    ]
    if refs == [""]:
        mistakes = [(1 - expected, "for a question without an answer (SQuAD v2.0) F1 is 1 exactly when the "
                                   "prediction is empty after normalisation, and 0 otherwise.")]
    scale = 100 if value > 1 else 1  # the same slips, given as a percentage
    matched = [m for v, m in mistakes if close(value / scale, v) and not close(v, expected)]
    if matched:
        return _no(f"{value:g} " + " Or it ".join(matched))
    if not 0 <= value <= 100:
        return _no(f"{value:g} is not a score: F1 lies between 0 and 1 (0 and 100 as a percentage).")
    return _no(f"{value:g} is not it. Normalise both answers, count the shared words as a bag, P = shared / "
               "predicted words, R = shared / reference words, F1 = 2PR / (P + R), and keep the best reference.")
