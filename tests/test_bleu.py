"""Caption BLEU-4: a hand computation, the edge cases, and agreement with sacrebleu."""
import math

import numpy as np
import pytest

from adapterlab.metrics.bleu import caption_tokens, corpus_bleu
from adapterlab.worlds.scenes import random_scene
from adapterlab.worlds.scenetext import captions


def test_bleu_matches_a_hand_computed_example():
    cands = ["the the the cat", "a cat is on the mat"]
    refs = [["the cat sat", "a cat sat on it"], ["a cat is on the big red mat"]]
    # sentence 1: 1-grams the x3 (clipped to 1) + cat = 2/4; 2-grams "the cat" = 1/3; 3-grams 0/2; 4-grams 0/1
    # sentence 2: 1-grams 6/6; 2-grams 4/5 ("the mat" missing); 3-grams 3/4; 4-grams 2/3
    # corpus: p1 = 8/10, p2 = 5/8, p3 = 3/6, p4 = 2/4
    # c = 4 + 6 = 10; r = 3 (lengths 3 and 5 tie at distance 1: the shorter) + 8 = 11; BP = exp(1 - 11/10)
    expected = math.exp(1 - 11 / 10) * (0.8 * 0.625 * 0.5 * 0.5) ** 0.25
    got = corpus_bleu(cands, refs)
    assert got["precisions"] == pytest.approx([0.8, 0.625, 0.5, 0.5])
    assert (got["c"], got["r"]) == (10, 11)
    assert got["bleu"] == pytest.approx(expected, abs=1e-12)
    assert got["bleu"] == pytest.approx(0.538019, abs=1e-6)


def test_bleu_edge_cases():
    assert corpus_bleu(["three red circles in the top left corner"],
                       [["three red circles in the top left corner", "x"]])["bleu"] == pytest.approx(1.0)
    assert corpus_bleu(["Three red circles, in the top-left corner."],
                       [["three red circles in the top left corner"]])["bleu"] == pytest.approx(1.0)  # COCO tokens
    assert corpus_bleu(["red circles top left"], [["three red circles in the top left corner"]])["bleu"] == 0.0
    short = corpus_bleu(["a b c d"], [["a b c d e f g h"]])
    assert short["precisions"] == [1, 1, 1, 1] and short["bleu"] == pytest.approx(math.exp(1 - 8 / 4))
    with pytest.raises(ValueError, match="2 candidates but 1"):
        corpus_bleu(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="list of reference captions"):
        corpus_bleu(["a"], ["a"])


def test_bleu_agrees_with_sacrebleu_on_scene_captions():
    """sacrebleu (unsmoothed, on our COCO tokens) is the reference implementation. Candidates: captions
    of the right scene with words dropped or swapped, or of another scene; 1 to 5 references each."""
    sacrebleu = pytest.importorskip("sacrebleu")
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng) for _ in range(40)]

    def candidate(scene):
        words = captions(scene if rng.random() < 0.8 else scenes[rng.integers(len(scenes))])[rng.integers(5)].split()
        for _ in range(rng.integers(0, 3)):
            i = rng.integers(len(words))
            if rng.random() < 0.5:
                del words[i]
            else:
                words[i] = words[rng.integers(len(words))]
        return " ".join(words)

    scores = []
    for trial in range(20):
        picked = [scenes[i] for i in rng.integers(len(scenes), size=rng.integers(1, 8))]
        cands = [candidate(s) for s in picked]
        refs = [list(rng.permutation(captions(s))[: rng.integers(1, 6)]) for s in picked]
        ours = corpus_bleu(cands, refs)
        tok = lambda text: " ".join(caption_tokens(text))  # noqa: E731
        streams = [[tok(r[i]) if i < len(r) else None for r in refs] for i in range(max(map(len, refs)))]
        theirs = sacrebleu.metrics.BLEU(tokenize="none", smooth_method="none", force=True).corpus_score(
            [tok(c) for c in cands], streams)
        assert (ours["c"], ours["r"]) == (theirs.sys_len, theirs.ref_len), trial
        assert [100 * p for p in ours["precisions"]] == pytest.approx(theirs.precisions, abs=1e-9), trial
        assert 100 * ours["bleu"] == pytest.approx(theirs.score, abs=1e-9), trial
        scores.append(ours["bleu"])
    assert sum(0 < b < 1 for b in scores) >= 15  # a test of real scores, not of zeros and perfect matches
