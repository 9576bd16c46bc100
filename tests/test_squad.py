"""The SQuAD metric against examples worked by hand (the expected numbers are derived in the comments)."""
import pytest

from adapterlab.metrics.squad import evaluate, exact_match, f1_score, normalize_answer, reference_answers, score_question


def record(qid: str, answers: list[str]) -> dict:
    return {"id": qid, "context": "", "question": "", "answers": {"text": answers, "answer_start": [0] * len(answers)}}


def test_normalisation_drops_case_punctuation_articles_and_extra_spaces():
    assert normalize_answer("The Cat sat") == "cat sat"
    assert normalize_answer("cat sat!") == "cat sat"
    assert normalize_answer("  An  apple,  a day ") == "apple day"
    # articles only as whole words: "banana", "theatre" and "anna" keep their letters
    assert normalize_answer("The banana at the theatre, Anna") == "banana at theatre anna"
    # punctuation goes before the articles: "the-cat" -> "thecat" is one word, not "the" + "cat"
    assert normalize_answer("the-cat") == "thecat"


def test_exact_match_after_normalisation():
    assert exact_match("cat sat!", "The Cat sat") == 1.0
    assert exact_match("cat", "cats") == 0.0
    assert exact_match("", "cat") == 0.0


def test_f1_partial_overlaps():
    # pred "the black cat" -> [black, cat]; ref "a big black dog" -> [big, black, dog]; shared: black
    # P = 1/2, R = 1/3, F1 = 2 * (1/6) / (5/6) = 2/5
    assert f1_score("the black cat", "a big black dog") == pytest.approx(0.4)
    # pred "black dog" -> 2 words, both in the 3-word ref: P = 1, R = 2/3, F1 = (4/3) / (5/3) = 0.8
    assert f1_score("black dog", "big black dog") == pytest.approx(0.8)
    # repeated words count at most as often as in the other answer: shared = min(3, 1) = 1
    # P = 1/3, R = 1, F1 = (2/3) / (4/3) = 0.5
    assert f1_score("cat cat cat", "cat") == pytest.approx(0.5)
    assert f1_score("dog", "cat") == 0.0
    assert f1_score("The Cat sat", "cat sat!") == 1.0


def test_best_over_several_references():
    refs = ["Oslo", "in Oslo, Norway", "Paris"]
    # "oslo norway" equals none of "oslo", "in oslo norway", "paris" -> EM 0
    # F1: vs "oslo": P = 1/2, R = 1 -> 2/3;  vs "in oslo norway": P = 1, R = 2/3 -> 0.8;  vs "paris": 0
    em, f1 = score_question("Oslo Norway", refs)
    assert em == 0.0 and f1 == pytest.approx(0.8)
    # EM and F1 may come from different references: "Paris" matches the third exactly
    assert score_question("paris.", refs) == (1.0, 1.0)


def test_no_answer_questions_count_only_an_empty_prediction():
    refs = reference_answers(record("q", []))
    assert refs == [""]
    assert score_question("", refs) == (1.0, 1.0)
    assert score_question("Oslo", refs) == (0.0, 0.0)
    # a prediction that is empty after normalisation is no answer too (as in the official script)
    assert score_question("The.", refs) == (1.0, 1.0)
    # and the other way round: an empty prediction for an answerable question scores nothing
    assert score_question("", ["Oslo"]) == (0.0, 0.0)
    # a reference that normalises to nothing does not count as an answer
    assert reference_answers(record("q", ["the", "Oslo"])) == ["Oslo"]


def test_evaluate_averages_in_percent_and_splits_has_and_no_answer():
    records = [record("a", ["cat"]), record("b", ["big black dog", "dog"]), record("c", []), record("d", [])]
    predictions = {"a": "The cat.",    # EM 1, F1 1
                   "b": "black dog",   # EM 0; F1 max(0.8 vs "big black dog", (2*1/2*1)/(1/2+1) = 2/3 vs "dog") = 0.8
                   "c": "",            # no answer, predicted none: 1, 1
                   "d": "Oslo"}        # no answer, predicted one: 0, 0
    result = evaluate(records, predictions)
    assert result["total"] == 4 and result["HasAns_total"] == 2 and result["NoAns_total"] == 2
    assert result["exact"] == pytest.approx(100 * (1 + 0 + 1 + 0) / 4)      # 50
    assert result["f1"] == pytest.approx(100 * (1 + 0.8 + 1 + 0) / 4)       # 70
    assert result["HasAns_exact"] == pytest.approx(50.0)
    assert result["HasAns_f1"] == pytest.approx(90.0)                       # (1 + 0.8) / 2
    assert result["NoAns_exact"] == pytest.approx(50.0) and result["NoAns_f1"] == pytest.approx(50.0)


def test_a_v1_set_has_no_no_answer_scores_and_nested_answers_work():
    records = [record("a", ["Oslo"]),
               {"id": "b", "context": "", "question": "", "answers": [{"text": "a red hat", "answer_start": 0}]}]
    result = evaluate(records, {"a": "oslo", "b": "hat"})  # b: [hat] vs [red, hat]: P 1, R 1/2 -> F1 2/3
    assert result["exact"] == pytest.approx(50.0)
    assert result["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert result["NoAns_total"] == 0 and "NoAns_exact" not in result and "NoAns_f1" not in result


def test_evaluate_names_unknown_and_missing_predictions():
    records = [record("a", ["cat"]), record("b", [])]
    with pytest.raises(KeyError, match="'zz'"):
        evaluate(records, {"a": "cat", "b": "", "zz": "dog"})
    with pytest.raises(KeyError, match="no prediction.*'b'"):
        evaluate(records, {"a": "cat"})
    with pytest.raises(ValueError, match="more than once"):
        evaluate([record("a", ["cat"]), record("a", ["dog"])], {"a": "cat"})
