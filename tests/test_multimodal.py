"""Multi-modal tasks, BLEU-4, the training bridge and the demo's outputs."""
import json
import math

import numpy as np
import pytest
import torch

from adapterlab import AdapterConfig, Llama, LlamaConfig, add_adapter
from adapterlab.adapter import adapted_layers
from adapterlab.model import init_weights
from adapterlab.multimodal import (
    CONTEXTS, KINDS, LETTERS, OPTIONS, ImageTokenBridge, MultimodalConfig, captions, corpus_bleu,
    example_dataset, image_tokens, knowledge_facts, knowledge_question, make_data, parse_answer,
    run_multimodal_demo, scene_answer, scene_question,
)
from adapterlab.scenes import Scene
from adapterlab.train import loss_sum


# ---------------------------------------------------------------------------- BLEU-4
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


# ---------------------------------------------------------------------------- tasks
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


def test_knowledge_facts_and_data_split():
    facts = knowledge_facts()
    assert all(len(f.options) == 4 and f.answer in f.options and f.answer in f.solution for f in facts)
    ex = knowledge_question(facts[0])
    assert ex.context == "none" and "Context: N/A" in ex.prompt
    cfg = MultimodalConfig(train_scenes=40, test_scenes=6, image_questions=30, text_questions=10, caption_examples=10)
    d1, d2 = make_data(cfg), make_data(cfg)
    assert [e.prompt + e.response for e in d1.train] == [e.prompt + e.response for e in d2.train]  # deterministic
    assert not {f.question for f in d1.train_facts} & {f.question for f in d1.test_facts}
    test_questions = {e.prompt for e in d1.test if e.context == "none"}
    assert test_questions and not test_questions & {e.prompt for e in d1.train}  # held-out facts
    counts = {c: sum(e.context == c for e in d1.test) for c in CONTEXTS + ("caption",)}
    assert counts == {"image": 4 * 6, "text": 6, "none": len(d1.test_facts), "caption": 6}
    assert all(e.image is not None for e in d1.train if e.context in ("image", "caption"))


# ---------------------------------------------------------------------------- images into the training loop
def small_adapted(visual_dim=8):
    cfg = LlamaConfig(dim=32, n_layers=2, n_heads=4, vocab_size=50, multiple_of=16, max_seq_len=512)
    model = init_weights(Llama(cfg), seed=0)
    add_adapter(model, AdapterConfig(prompt_len=3, layers=2, visual_dim=visual_dim))
    g = torch.Generator().manual_seed(1)
    for i in adapted_layers(model):
        model.layers[i].attention.adapter.gate.data = torch.randn(1, 4, 1, 1, generator=g)
    return model


def test_image_tokens_are_zero_without_a_picture():
    model = small_adapted()
    feats = torch.randn(5, 8)
    with torch.no_grad():
        ip = image_tokens(model, feats, torch.tensor([3, -1, 0]))
        assert torch.equal(ip[1], torch.zeros(32))
        assert torch.allclose(ip[0], model.visual_proj(feats[3:4])[0], atol=1e-6)
        assert torch.allclose(ip[2], model.visual_proj(feats[0:1])[0], atol=1e-6)
    assert image_tokens(model, None, torch.tensor([0])) is None


class _ToyTokenizer:
    bos_id, eos_id = 1, 2

    def encode(self, text, bos=True, eos=False):
        ids = [3 + (ord(ch) % 40) for ch in text]
        return ([1] if bos else []) + ids + ([2] if eos else [])


def test_bridge_gives_the_loss_of_the_multimodal_forward():
    """The loop's loss through the bridge equals the loss of model(tokens, visual=I_p) on the response."""
    model = small_adapted()
    feats = torch.randn(4, 8)
    rng = np.random.default_rng(0)
    scene = Scene("circle", "red", 2, "top left")
    examples = [scene_question(scene, "colour", rng, "image", 2), scene_question(scene, "count", rng, "text", None)]
    data = example_dataset(_ToyTokenizer(), examples, max_seq_len=512)
    assert data.tokens[0][0] == 3 and data.tokens[1][0] == 0  # picture codes: index + 1, 0 = none
    from adapterlab.data import collate

    tokens, labels = collate([data[0], data[1]])
    bridged = loss_sum(ImageTokenBridge(model, feats), tokens, labels)
    # direct: the same examples without the code column, I_p for example 0 only
    direct_tokens, direct_labels = tokens[:, 1:], labels[:, 1:]
    visual = image_tokens(model, feats, torch.tensor([2, -1]))
    logits = model(direct_tokens, visual=visual)
    direct = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), direct_labels[:, 1:].flatten(),
                                               ignore_index=-100, reduction="sum")
    assert torch.allclose(bridged, direct, rtol=1e-5)
    assert data.n_targets([0, 1]) == int((direct_labels[:, 1:] != -100).sum())
    bridged.backward()
    assert model.visual_proj.fc1.weight.grad.abs().max() > 0


# ---------------------------------------------------------------------------- the demo, tiny
def test_demo_writes_every_output(tmp_path):
    cfg = MultimodalConfig(train_scenes=120, test_scenes=4, dim=32, n_layers=2, n_heads=2, vocab_size=200,
                           pretrain_steps=3, pretrain_batch_size=4, pretrain_seq_len=64, encoder_steps=2,
                           adapter_layers=2, steps=3, batch_size=8, image_questions=40, text_questions=10,
                           caption_examples=10, max_new_tokens=6)
    metrics = run_multimodal_demo(tmp_path, cfg, progress=False, verbose=False, n_samples=4, cache=False)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("accuracy", "accuracy_by_context", "text_only_accuracy", "text_only_accuracy_by_context",
                "captions", "trainable_params", "projection_params", "demo_seconds"):
        assert key in saved and saved[key] == metrics[key]
    assert set(saved["accuracy_by_context"]) == set(saved["text_only_accuracy_by_context"]) == {"image", "text", "none"}
    assert "bleu4" in saved["captions"]
    assert saved["trainable_params"] == saved["text_only_trainable_params"] + saved["projection_params"]
    for name in ("gates.jsonl", "gates.png", "samples.png", "samples.json", "text_only/gates.jsonl"):
        assert (tmp_path / name).is_file(), name
    first = json.loads((tmp_path / "gates.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and all(g == 0 for row in first["gates"] for g in row)  # zero-init
    assert len(json.loads((tmp_path / "samples.json").read_text())) == 4


def test_scene_base_is_cached_and_reloaded_exactly(tmp_path, monkeypatch):
    from adapterlab.multimodal import load_scene_base, pretrain_corpus

    monkeypatch.setenv("ADAPTERLAB_CACHE", str(tmp_path))
    cfg = MultimodalConfig(train_scenes=60, dim=32, n_layers=2, n_heads=2, vocab_size=200, pretrain_steps=2,
                           pretrain_batch_size=4, pretrain_seq_len=64)
    from adapterlab.scenes import make_scenes

    scenes, _ = make_scenes(60, seed=1)
    corpus = pretrain_corpus(scenes, knowledge_facts(), np.random.default_rng(0))
    built, tok1, info1 = load_scene_base(corpus, cfg, progress=False)
    loaded, tok2, info2 = load_scene_base(corpus, cfg, progress=False)
    assert (info1["cached"], info2["cached"]) == (False, True) and info1["folder"] == info2["folder"]
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), loaded.state_dict().values()))
    assert tok1.encode("The colour is red.") == tok2.encode("The colour is red.")
    other = load_scene_base(corpus, MultimodalConfig(**{**cfg.to_dict(), "pretrain_steps": 3}), progress=False)[2]
    assert other["folder"] != info1["folder"] and not other["cached"]  # a different recipe, a different folder


# ---------------------------------------------------------------------------- the command line
TINY = dict(train_scenes=120, test_scenes=4, dim=32, n_layers=2, n_heads=2, vocab_size=200, pretrain_steps=3,
            pretrain_batch_size=4, pretrain_seq_len=64, encoder_steps=2, adapter_layers=2, steps=3, batch_size=8,
            image_questions=40, text_questions=10, caption_examples=10, max_new_tokens=6)


def test_demo_multimodal_command(tmp_path, monkeypatch, capsys):
    """`adapterlab demo --multimodal --out DIR` runs the multi-modal demo with the options it understands."""
    import dataclasses

    import adapterlab.multimodal as mm
    from adapterlab.cli import main

    monkeypatch.setenv("ADAPTERLAB_CACHE", str(tmp_path / "cache"))
    tiny = dataclasses.make_dataclass("TinyConfig", [(k, type(v), dataclasses.field(default=v)) for k, v in TINY.items()],
                                      bases=(MultimodalConfig,))
    monkeypatch.setattr(mm, "MultimodalConfig", tiny)
    out = tmp_path / "mm"
    assert main(["demo", "--multimodal", "--out", str(out), "--steps", "4", "--no-progress", "--samples", "2"]) == 0
    printed = capsys.readouterr().out
    assert "config: steps=4" in printed and "Image-context accuracy" in printed
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["multimodal_config"]["steps"] == 4 and saved["multimodal_config"]["dim"] == 32
    assert len(saved["samples"]) == 2 and (out / "samples.png").is_file()

    # options that mean nothing to the multi-modal demo are refused, not silently dropped
    assert main(["demo", "--multimodal", "--out", str(out), "--gate", "layer"]) == 2
    assert "does not use --gate" in capsys.readouterr().err
