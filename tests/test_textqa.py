"""SQuAD-style tasks on the tiny world: generators, the file layout, the encoder's input, span
prediction, the span loss, MLM masking and the text base's cache (with a tiny recipe)."""
import dataclasses
import json
import re

import pytest
import torch
from torch import nn

from adapterlab.worlds import textqa as tq
from adapterlab.encoders.transformer import TextEncoder, TextEncoderConfig, init_encoder_weights, set_head
from adapterlab.metrics.squad import evaluate
from adapterlab.worlds.tinyworld import ATTRIBUTES, NAMES, QUESTIONS, Recipe, build_world


@pytest.fixture(scope="module")
def vocab():
    return tq.tiny_world_vocab()


@pytest.fixture(scope="module")
def world():
    return tq.tiny_world()


def asked(question: str) -> tuple[str, str]:
    """(name, attribute) a generated question asks about, read back from the question templates."""
    for attribute, templates in QUESTIONS.items():
        for name in NAMES:
            if question in {t.format(n=name) for t in templates}:
                return name, attribute
    raise AssertionError(f"not a tiny-world question: {question!r}")


def states(context: str, name: str, attribute: str) -> bool:
    """Does some sentence of the context state ``attribute`` of ``name``?"""
    values = "|".join(ATTRIBUTES[attribute])
    return any(re.search(rf"\b{name}\b", s) and re.search(rf"\b({values})\b", s) for s in context.split(". "))


def test_generators_are_deterministic_for_a_seed_and_differ_across_seeds(world):
    for version in tq.VERSIONS:
        a = tq.make_split(version, "train", n=60, seed=0, world=world)
        assert a == tq.make_split(version, "train", n=60, seed=0, world=world)
        other = tq.make_split(version, "train", n=60, seed=1, world=world)
        assert [r["context"] for r in a] != [r["context"] for r in other]
        assert len(a) == 60 and len({r["id"] for r in a}) == 60
    sets = tq.make_squad("1.1", sizes={"train": 30, "val": 20, "test": 10}, world=world)
    assert {k: len(v) for k, v in sets.items()} == {"train": 30, "val": 20, "test": 10}
    with pytest.raises(ValueError, match="version"):
        tq.make_split("3.0", "train", n=5)


def test_every_v1_answer_is_the_span_at_answer_start_and_is_asked_about(world):
    records = [r for split in tq.SPLIT_SIZES for r in tq.make_split("1.1", split, n=200, world=world)]
    for r in records:
        (text,), (start,) = r["answers"]["text"], r["answers"]["answer_start"]
        assert r["context"][start: start + len(text)] == text
        assert r["context"].count(text) == 1  # values are unique within a paragraph
        assert 2 <= r["context"].count(".") <= 5  # 2-5 sentences
        name, attribute = asked(r["question"])
        assert text in ATTRIBUTES[attribute]
        sentence = next(s for s in r["context"].split(". ") if text in s)
        assert re.search(rf"\b{name}\b", sentence)  # the answer is stated about the person asked about


def test_v2_has_about_a_third_unanswerable_questions_and_they_are_unanswerable(world):
    records = tq.make_split("2.0", "train", n=600, world=world)
    empty = [r for r in records if not r["answers"]["text"]]
    assert 0.25 < len(empty) / len(records) < 0.42
    for r in empty:
        assert r["answers"]["answer_start"] == []
        assert not states(r["context"], *asked(r["question"]))
    for r in records:
        if r["answers"]["text"]:
            assert states(r["context"], *asked(r["question"]))


def test_test_paragraphs_hold_other_people_and_values_that_contradict_the_world(world):
    sets = tq.make_squad("2.0", sizes={"train": 200, "val": 50, "test": 200}, world=world)
    train_names = {p.name for p in world.train_people}
    heldout_names = {p.name for p in world.heldout_people}
    mentioned = {split: {n for r in recs for n in NAMES if re.search(rf"\b{n}\b", r["context"] + r["question"])}
                 for split, recs in sets.items()}
    assert mentioned["train"] <= train_names and mentioned["val"] <= train_names
    assert mentioned["test"] <= heldout_names
    for r in sets["test"]:
        if r["answers"]["text"]:
            name, attribute = asked(r["question"])
            assert r["answers"]["text"][0] != world.person(name).get(attribute)  # memory would answer wrongly


def test_official_file_layout_round_trips(tmp_path, world):
    for version, tag in (("1.1", "1.1"), ("2.0", "v2.0")):
        records = tq.make_split(version, "val", n=40, world=world)
        path = tq.save_squad_json(records, tmp_path / f"{version}.json")
        dataset = json.loads(path.read_text())
        assert dataset["version"] == tag
        qa = dataset["data"][0]["paragraphs"][0]["qas"][0]
        fields = {"id", "question", "answers"} | ({"is_impossible"} if tag == "v2.0" else set())
        assert set(qa) == fields
        assert tq.load_squad_json(path) == records
    (tmp_path / "bad.json").write_text('{"data": [{"title": "x"}]}')
    with pytest.raises(ValueError, match="not a SQuAD file"):
        tq.load_squad_json(tmp_path / "bad.json")


def test_offsets_point_at_each_piece(vocab):
    text = "By trade, Celia is a teacher.  Every morning Paula feeds the goldfish."  # (two spaces)
    pieces = vocab.encode_with_offsets(text)
    assert [p for p, _, _ in pieces] == vocab.encode(text)
    for piece_id, b, e in pieces:
        assert text[b:e] == vocab.tokenizer.sp.id_to_piece(piece_id).replace("\u2581", " ").lstrip(" ")
    assert "".join(text[b:e] for _, b, e in pieces) == text.replace(" ", "")
    with pytest.raises(ValueError, match="does not know"):
        vocab.encode_with_offsets("Caf\u00e9 \u00fcber alles")


def test_gold_token_span_decodes_to_the_answer_for_every_training_record(vocab, world):
    for version in tq.VERSIONS:
        records = tq.make_split(version, "train", world=world)
        enc = tq.encode_qa(records, vocab, tq.QA_MAX_LEN)
        assert list(enc) == ["tokens", "mask", "start", "end"]
        tokens, mask, start, end = enc.values()
        assert tokens.shape == mask.shape == (len(records), tq.QA_MAX_LEN)
        assert (tokens[:, 0] == vocab.cls_id).all() and (tokens[~mask] == vocab.pad_id).all()
        assert (tokens[mask] != vocab.pad_id).all()
        for i, r in enumerate(records):
            if r["answers"]["text"]:
                assert 0 < start[i] <= end[i]
                assert vocab.decode(tokens[i, start[i]: end[i] + 1].tolist()) == r["answers"]["text"][0]
            else:
                assert start[i] == end[i] == 0
            seps = (tokens[i] == vocab.sep_id).nonzero().flatten().tolist()
            assert len(seps) == 2 and seps[1] == mask[i].sum() - 1  # [CLS] q [SEP] c [SEP]
            assert vocab.decode(tokens[i, 1: seps[0]].tolist()) == r["question"]
    with pytest.raises(ValueError, match="max_len"):
        tq.encode_qa(records[:1], vocab, max_len=10)


class FixedScores(nn.Module):
    """A stand-in span model that returns given start/end scores, whatever the tokens."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, tokens, mask=None):
        return self.logits[: tokens.shape[0], : tokens.shape[1]]


def test_predict_spans_picks_the_best_span_or_no_answer_by_the_null_score(vocab, world):
    a, b = (p.name for p in world.people[:2])
    context = f"{a} lives in Oslo. {b} has a cat."
    record = {"id": "q", "title": "t", "context": context, "question": f"Where does {a} live?",
              "answers": {"text": ["Oslo"], "answer_start": [context.index("Oslo")]}}
    lay = tq.qa_layout(record, vocab, tq.QA_MAX_LEN)
    oslo = lay.start
    assert vocab.decode([lay.ids[oslo]]) == "Oslo"
    logits = torch.zeros(1, tq.QA_MAX_LEN, 2)
    logits[0, oslo, 0] = logits[0, oslo, 1] = 5.0  # the span "Oslo" scores 10; null scores 0
    logits[0, oslo + 1, 1] = 4.0  # "Oslo." scores 9: lower
    assert tq.predict_spans(FixedScores(logits), [record], vocab) == {"q": "Oslo"}
    logits[0, 0, :] = 6.0  # null now scores 12 > 10
    assert tq.predict_spans(FixedScores(logits), [record], vocab, allow_empty=True) == {"q": ""}
    assert tq.predict_spans(FixedScores(logits), [record], vocab, allow_empty=False) == {"q": "Oslo"}
    # None: a set with answers only is v1.1-style: never empty
    assert tq.predict_spans(FixedScores(logits), [record], vocab) == {"q": "Oslo"}


def test_best_span_keeps_start_before_end_and_the_length_limit():
    start, end = torch.tensor([0.0, 5.0, 0.0, 0.0]), torch.tensor([4.0, 0.0, 1.0, 0.0])
    # (1, 0) would score 9 but ends before it starts; allowed: (0,0)=4, (1,1)=5, (1,2)=6, ... -> (1, 2)
    assert tq.best_span(start, end, 4, max_answer_tokens=2) == (1, 2, 6.0)
    assert tq.best_span(start, end, 4, max_answer_tokens=1) == (1, 1, 5.0)  # one token at most
    start, end = torch.tensor([5.0, 0.0, 0.2, 0.0]), torch.tensor([0.0, 0.5, 0.0, 7.0])
    assert tq.best_span(start, end, 4, max_answer_tokens=4) == (0, 3, 12.0)  # the whole context
    i, j, score = tq.best_span(start, end, 4, max_answer_tokens=2)  # (0, 3) too long: (2, 3) = 7.2
    assert (i, j) == (2, 3) and score == pytest.approx(7.2)


def test_qa_loss_is_the_mean_of_two_masked_cross_entropies_and_has_gradients():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 2, requires_grad=True)
    start, end = torch.tensor([1, 0, 4]), torch.tensor([2, 0, 4])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]]).bool()
    loss = tq.qa_loss(logits, start, end, mask)
    by_hand = 0.0
    for b in range(3):
        n = int(mask[b].sum())
        by_hand += -torch.log_softmax(logits[b, :n, 0], 0)[start[b]] - torch.log_softmax(logits[b, :n, 1], 0)[end[b]]
    assert loss.item() == pytest.approx(by_hand.item() / 6, rel=1e-6)
    loss.backward()
    assert (logits.grad[~mask] == 0).all() and logits.grad[mask].abs().sum() > 0
    with pytest.raises(ValueError, match="set_head"):
        tq.qa_loss(torch.zeros(2, 5, 3), start[:2], end[:2])


def test_a_span_head_on_a_tiny_encoder_trains(vocab, world):
    records = tq.make_split("2.0", "train", n=8, world=world)
    tokens, mask, start, end = tq.encode_qa(records, vocab, tq.QA_MAX_LEN).values()
    config = TextEncoderConfig(vocab_size=vocab.size, max_seq_len=tq.QA_MAX_LEN, dim=16, n_layers=1, n_heads=2,
                               mlp_hidden=32)
    model = set_head(init_encoder_weights(TextEncoder(config), seed=0), 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        loss = tq.qa_loss(model(tokens, mask), start, end, mask)
        opt.zero_grad()
        loss.backward()
        assert model.tok_embeddings.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    scores = evaluate(records, tq.predict_spans(model, records, vocab))
    assert 0 <= scores["f1"] <= 100 and scores["total"] == 8


def test_mask_tokens_follows_robertas_80_10_10_recipe(vocab):
    corpus = build_world(Recipe())[1][:300]
    windows = tq.text_windows(corpus, vocab, 64)
    assert (windows[:, 0] == vocab.cls_id).all() and windows.shape[1] == 64
    inputs, labels = tq.mask_tokens(windows, vocab, torch.Generator().manual_seed(0))
    again = tq.mask_tokens(windows, vocab, torch.Generator().manual_seed(0))
    assert torch.equal(inputs, again[0]) and torch.equal(labels, again[1])
    chosen = labels != -100
    pieces = windows < vocab.n_pieces
    assert not chosen[~pieces].any()  # [CLS] and [SEP] are never chosen
    assert torch.equal(labels[chosen], windows[chosen]) and torch.equal(inputs[~chosen], windows[~chosen])
    n = chosen.sum().item()
    assert abs(n / pieces.sum().item() - 0.15) < 0.01
    masked = (inputs[chosen] == vocab.mask_id).sum().item() / n
    kept = (inputs[chosen] == windows[chosen]).sum().item() / n
    assert abs(masked - 0.8) < 0.03 and abs(kept - 0.1) < 0.03 and abs(1 - masked - kept - 0.1) < 0.03
    assert (inputs < vocab.size).all() and (inputs[chosen] != vocab.pad_id).all()


TINY = dataclasses.replace(tq.TEXT_RECIPE, dim=16, n_layers=1, n_heads=2, mlp_hidden=32, steps=3, batch_size=4,
                           warmup_steps=1, heldout_passes=1)


def test_text_base_is_built_once_deterministically_and_loads_frozen(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERLAB_CACHE", str(tmp_path))
    name = tq.text_base_name(TINY)
    assert re.fullmatch(r"textenc-[0-9a-f]{12}", name) and name != tq.text_base_name()
    folder = tq.build_text_base(progress=False, recipe=TINY)
    assert folder == tmp_path / name
    files = {"model.safetensors", "config.json", "tokenizer.model", "textbase.json"}
    assert {p.name for p in folder.iterdir()} == files
    weights = (folder / "model.safetensors").read_bytes()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert tq.build_text_base(progress=False, recipe=TINY) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # not built again
    tq.build_text_base(progress=False, force=True, recipe=TINY)
    assert (folder / "model.safetensors").read_bytes() == weights  # the same bytes from a fresh build
    info = tq.text_base_info(TINY)
    assert info["key"] == name and len(info["loss_history"]) == 2 and 0 <= info["heldout_mlm"]["accuracy"] <= 1
    model = tq.load_text_base(progress=False, recipe=TINY)
    assert not any(p.requires_grad for p in model.parameters())
    assert model.vocab.size == model.config.vocab_size == model.head.out_features
