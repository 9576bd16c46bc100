"""What the scenes are asked and told: ScienceQA-style questions, facts, captions, and scoring answers."""
import numpy as np
import pytest

from adapterlab.metrics.bleu import corpus_bleu
from adapterlab.worlds.scenes import Scene
from adapterlab.worlds.scenetext import (
    KINDS, LETTERS, OPTIONS, caption_example, captions, knowledge_facts, knowledge_question, parse_answer,
    pretrain_corpus, scene_answer, scene_question, score,
)


def test_scienceqa_style_questions():
    rng = np.random.default_rng(0)
    scene = Scene("triangle", "blue", 3, "bottom left")
    for kind in KINDS:
        img = scene_question(scene, kind, rng, "image", 7)
        txt = scene_question(scene, kind, rng, "text", None)
        word, solution = scene_answer(scene, kind)
        for ex in (img, txt):
            lines = ex.prompt.split("\n")
            assert [l.split(":")[0] for l in lines] == ["Question", "Context", "Options", "Answer"]
            assert lines[2] == "Options: " + " ".join(f"({L}) {o}" for L, o in zip(LETTERS, OPTIONS[kind]))
            assert ex.answer == LETTERS[OPTIONS[kind].index(word)]
            assert ex.response == f" {solution} The answer is ({ex.answer})."
            assert parse_answer(ex.response) == ex.answer and word in solution
        assert img.prompt.split("\n")[1] == "Context: N/A" and img.image == 7 and img.context == "image"
        assert "three blue triangles" in txt.prompt and txt.image is None and txt.context == "text"
    assert parse_answer("The shapes are red.") is None
    assert captions(Scene("circle", "red", 1, "top right"))[0] == "a red circle in the top right corner"
    with pytest.raises(ValueError, match="unknown question kind 'size'"):
        scene_answer(scene, "size")


def test_the_base_reads_every_fact_but_never_a_picture():
    rng = np.random.default_rng(0)
    scenes = [Scene("square", "green", 2, "top left"), Scene("cross", "yellow", 1, "bottom right")]
    facts = knowledge_facts()
    corpus = pretrain_corpus(scenes, facts, rng)
    assert all(any(f.solution in doc for doc in corpus) for f in facts)
    assert any("two green squares" in doc for doc in corpus) and any("a yellow cross" in doc for doc in corpus)
    assert not any("Context: N/A" in doc and "picture" in doc.split("\n")[0] for doc in corpus)  # no image question


def test_score_counts_per_context_and_kind_and_scores_captions():
    rng = np.random.default_rng(0)
    scene = Scene("circle", "red", 2, "top left")
    image = [scene_question(scene, kind, rng, "image", 0) for kind in KINDS]
    text = scene_question(scene, "colour", rng, "text", None)
    none = knowledge_question(knowledge_facts()[0])
    caption = caption_example(scene, 0, rng)
    examples = image + [text, none, caption]
    wrong = "ABCD"[("ABCD".index(image[1].answer) + 1) % 4]
    outputs = [image[0].response, f"The answer is ({wrong}).", "no letter here", image[3].response,
               text.response, none.response, "two red circles in the top left"]
    s = score(examples, outputs)
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["accuracy_by_context"] == {"image": 0.5, "text": 1.0, "none": 1.0}
    assert s["image_accuracy_by_kind"] == {"colour": 1.0, "shape": 0.0, "count": 0.0, "corner": 1.0}
    assert s["counts"] == {"image": 4, "text": 1, "none": 1, "caption": 1}
    assert s["bleu4"] == corpus_bleu([outputs[-1]], [captions(scene)])["bleu"] and 0 < s["bleu4"] < 1


def test_score_of_a_set_without_picture_questions_warns_nothing_and_says_nan():
    import math
    import warnings

    from adapterlab.worlds.scenetext import score

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "Mean of empty slice" would raise here
        result = score([], [])
    assert math.isnan(result["accuracy"])
    assert all(math.isnan(v) for v in result["image_accuracy_by_kind"].values())
