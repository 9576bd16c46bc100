"""The SQuAD metric: exact match and token F1 as the official v1.1 / v2.0 evaluation defines them.

Extractive question answering is scored on text, not on token positions, after a normalisation
that forgives the differences no reader would call wrong::

    normalize_answer("The Cat sat!")  ->  "cat sat"      (lower case, no punctuation,
                                                           no articles a/an/the, single spaces)

* **exact match (EM)**: 1 when the normalised prediction equals a normalised reference, else 0;
* **F1**: the overlap of the normalised words, as a bag: precision = shared / predicted words,
  recall = shared / reference words, F1 = 2PR / (P + R);
* both take the **best over the reference answers** of a question (crowd workers often marked
  slightly different spans);
* **no answer (v2.0)**: a question without reference answers counts as correct (EM = F1 = 1)
  exactly when the prediction is empty after normalisation, and as wrong (0) otherwise; an empty
  prediction for a question that has an answer scores 0.

:func:`evaluate` averages over the questions and reports percentages, split into the questions
that have an answer (``HasAns_*``) and those that do not (``NoAns_*``), as the official v2.0 script
does; a v1.1 set (every question answerable) is scored the same way. Written from the definition
in our own code; ``tests/test_squad.py`` works examples by hand.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Mapping, Sequence

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, drop the articles a/an/the, collapse white space."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_tokens(text: str) -> list[str]:
    """The words F1 counts: the normalised text split on spaces ([] for an empty answer)."""
    return normalize_answer(text).split()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when prediction and reference are equal after :func:`normalize_answer`, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def f1_score(prediction: str, reference: str) -> float:
    """Token F1 between two answers. When either is empty (no answer), 1.0 if both are, else 0.0."""
    pred, ref = answer_tokens(prediction), answer_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    shared = sum((Counter(pred) & Counter(ref)).values())  # words in both, each counted min(times) times
    if shared == 0:
        return 0.0
    precision, recall = shared / len(pred), shared / len(ref)
    return 2 * precision * recall / (precision + recall)


def answer_texts(record: Mapping) -> list[str]:
    """The reference texts of a record, as given (``answers`` as ``{"text": [...]}`` or a list of
    ``{"text": ...}``, the nested file's form); [] for an unanswerable question."""
    answers = record.get("answers", {})
    return list(answers.get("text", [])) if isinstance(answers, Mapping) else [a["text"] for a in answers]


def reference_answers(record: Mapping) -> list[str]:
    """The reference texts that are not empty after normalisation; [""] if none (the only right
    answer is then no answer)."""
    return [t for t in answer_texts(record) if normalize_answer(t)] or [""]


def score_question(prediction: str, references: Sequence[str]) -> tuple[float, float]:
    """(EM, F1) of one prediction: the best over the references (``[""]`` means no answer)."""
    return (max(exact_match(prediction, r) for r in references),
            max(f1_score(prediction, r) for r in references))


def evaluate(records: Sequence[Mapping], predictions: Mapping[str, str]) -> dict:
    """Score predictions against SQuAD records; percentages, as the official v2.0 script reports.

    records: ``{"id", "context", "question", "answers": {"text": [...], "answer_start": [...]}}``
    (an empty ``text`` list: no answer). predictions: ``{id: predicted text}`` ("" = no answer),
    exactly one per record. Returns ``exact``, ``f1``, ``total`` over all questions and the same
    three for the answerable (``HasAns_``) and unanswerable (``NoAns_``) questions; as in the
    official script, ``HasAns_exact``/``HasAns_f1`` (``NoAns_...``) are left out when there are no
    such questions (``*_total`` is always there).
    """
    if not records:
        raise ValueError("evaluate: no records to score")
    ids = [r["id"] for r in records]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"evaluate: the question id {dup!r} appears more than once in the records")
    unknown = [p for p in predictions if p not in set(ids)]
    if unknown:
        raise KeyError(f"evaluate: {len(unknown)} prediction id(s) are not in the records, e.g. {unknown[0]!r}; "
                       "predict for the records you score, with their 'id' fields")
    missing = [i for i in ids if i not in predictions]
    if missing:
        raise KeyError(f"evaluate: no prediction for {len(missing)} of {len(ids)} questions, e.g. {missing[0]!r}; "
                       "give one per record ('' means 'no answer')")
    groups: dict[str, list[tuple[float, float]]] = {"HasAns": [], "NoAns": []}
    for r in records:
        group = "HasAns" if answer_texts(r) else "NoAns"  # as the official script: by the raw list
        groups[group].append(score_question(predictions[r["id"]], reference_answers(r)))
    everything = groups["HasAns"] + groups["NoAns"]
    result = {"exact": _percent(s[0] for s in everything), "f1": _percent(s[1] for s in everything),
              "total": len(everything)}
    for name, scores in groups.items():
        if scores:
            result[f"{name}_exact"] = _percent(s[0] for s in scores)
            result[f"{name}_f1"] = _percent(s[1] for s in scores)
        result[f"{name}_total"] = len(scores)
    return result


def _percent(values) -> float:
    values = list(values)
    return 100.0 * sum(values) / len(values)


__all__ = ["normalize_answer", "answer_tokens", "exact_match", "f1_score", "answer_texts", "reference_answers",
           "score_question", "evaluate"]
