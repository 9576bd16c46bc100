"""BLEU-4 for captions: corpus BLEU as Papineni et al. (2002) define it, as COCO reports it.

Why our own 30 lines and not a library: the definition is short enough to read in one go, and
:func:`corpus_bleu` returns its parts (the n-gram precisions, the brevity penalty, the candidate
and reference lengths), which the multi-modal notebook shows. The tests check it against a hand
computation and against sacrebleu, the reference implementation of machine translation papers.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence


def caption_tokens(text: str) -> list[str]:
    """COCO-style tokenisation for scoring: lower case, punctuation dropped, split on spaces."""
    return re.sub(r"[^a-z0-9 ]", " ", text.lower()).split()


def ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def corpus_bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> dict:
    """Corpus BLEU (Papineni et al., 2002), the standard definition used for COCO captions.

    p_n = sum over sentences of clipped n-gram matches / sum of candidate n-grams, where a
    candidate n-gram's count is clipped to its largest count in any one reference.
    BP = 1 if c > r else exp(1 - r / c), c = total candidate length, r = sum over sentences of
    the reference length closest to the candidate's (ties: the shorter one).
    BLEU = BP * exp(mean_n log p_n); 0 when some p_n is 0 (no smoothing).
    Returns {"bleu": .., "precisions": [p_1..p_N], "brevity_penalty": .., "c": .., "r": ..}.
    """
    if len(candidates) != len(references):
        raise ValueError(f"corpus_bleu: {len(candidates)} candidates but {len(references)} reference lists")
    matches, totals = [0] * max_n, [0] * max_n
    c = r = 0
    for cand, refs in zip(candidates, references):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"corpus_bleu: candidate {cand!r} needs a list of reference captions; got {refs!r}")
        cw = caption_tokens(cand)
        rws = [caption_tokens(ref) for ref in refs]
        c += len(cw)
        r += min((abs(len(rw) - len(cw)), len(rw)) for rw in rws)[1]  # closest length, shorter on ties
        for n in range(1, max_n + 1):
            counts = ngrams(cw, n)
            max_ref = Counter()
            for rw in rws:
                max_ref |= ngrams(rw, n)  # element-wise max over the references
            matches[n - 1] += sum(min(k, max_ref[g]) for g, k in counts.items())
            totals[n - 1] += max(len(cw) - n + 1, 0)
    precisions = [m / t if t else 0.0 for m, t in zip(matches, totals)]
    bp = 1.0 if c > r else (math.exp(1 - r / c) if c else 0.0)
    bleu = bp * math.exp(sum(math.log(p) for p in precisions) / max_n) if min(precisions) > 0 else 0.0
    return {"bleu": bleu, "precisions": precisions, "brevity_penalty": bp, "c": c, "r": r}


__all__ = ["caption_tokens", "ngrams", "corpus_bleu"]
