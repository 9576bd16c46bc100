"""The multi-modal run: its data, the scene base, pictures as per-example model inputs, the demo's outputs."""
import json

import numpy as np
import torch

from adapterlab import AdapterConfig, Llama, LlamaConfig, add_adapter
from adapterlab.adapter import adapted_layers
from adapterlab.data import get_batch
from adapterlab.losses import loss_sum
from adapterlab.model import init_weights
from adapterlab.train import TrainConfig
from adapterlab.worlds.multimodal import (
    MultimodalConfig, answer, example_dataset, image_inputs, make_data, run_multimodal_demo,
)
from adapterlab.worlds.scenes import Scene
from adapterlab.worlds.scenetext import CONTEXTS, knowledge_facts, knowledge_question, scene_question


# ---------------------------------------------------------------------------- tasks
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
    torch.manual_seed(0)  # the projection's nn.Linear init draws from the global RNG: the same model in any test order
    add_adapter(model, AdapterConfig(prompt_len=3, layers=2, visual_dim=visual_dim))
    g = torch.Generator().manual_seed(1)
    for i in adapted_layers(model):
        model.layers[i].attention.adapter.gate.data = torch.randn(1, 4, 1, 1, generator=g)
    return model


def test_image_inputs_mark_the_examples_without_a_picture():
    feats = torch.randn(5, 8)
    inputs = image_inputs(feats, [3, None, 0])
    assert torch.equal(inputs["image_features"], feats[[3, 0, 0]]) and inputs["has_image"].tolist() == [True, False, True]
    assert image_inputs(None, [3, None]) == {}  # a text-only model takes no picture inputs
    model = small_adapted()
    with torch.no_grad():
        ip = model.image_token(**inputs)  # (3, dim)
        assert torch.equal(ip[1], torch.zeros(32))  # no picture: I_p = 0, the prompts stay P_l
        assert torch.allclose(ip[0], model.visual_proj(feats[3:4])[0], atol=1e-6)


class _ToyTokenizer:
    bos_id, eos_id = 1, 2

    def encode(self, text, bos=True, eos=False):
        ids = [3 + (ord(ch) % 40) for ch in text]
        return ([1] if bos else []) + ids + ([2] if eos else [])

    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def _examples():
    rng = np.random.default_rng(0)
    scene = Scene("circle", "red", 2, "top left")
    return [scene_question(scene, "colour", rng, "image", 2), scene_question(scene, "count", rng, "text", None)]


def test_the_loop_trains_on_the_loss_of_the_multimodal_forward():
    """The training loop's loss on a batch equals the cross-entropy of model(tokens, visual=I_p) on the
    responses, with I_p from the example's picture (example 0) or 0 (example 1, no picture)."""
    model = small_adapted()
    feats = torch.randn(4, 8)
    data = example_dataset(_ToyTokenizer(), _examples(), max_seq_len=512, features=feats)
    tokens, labels, forward_args = get_batch(data, [0, 1])
    assert forward_args["has_image"].tolist() == [True, False] and torch.equal(forward_args["image_features"][0], feats[2])
    loop = loss_sum(model, tokens, labels, **forward_args)
    visual = torch.stack([model.visual_proj(feats[2:3])[0], torch.zeros(32)])  # (2, dim)
    logits = model(tokens, visual=visual)
    direct = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                               ignore_index=-100, reduction="sum")
    assert torch.allclose(loop, direct, rtol=1e-5)
    assert data.n_targets([0, 1]) == int((labels[:, 1:] != -100).sum())
    assert not torch.allclose(loop, loss_sum(model, tokens, labels), rtol=1e-5)  # the picture counts
    loop.backward()
    assert model.visual_proj.fc1.weight.grad.abs().max() > 0
    text_only = example_dataset(_ToyTokenizer(), _examples(), max_seq_len=512)
    assert text_only.forward_args == {} and text_only.tokens == data.tokens


def test_answers_use_the_picture_only_where_there_is_one():
    """In one batch, the example with a picture is answered with its image token, the one without as if
    the model had no picture inputs at all."""
    model = small_adapted()
    model.visual_proj.out_norm.weight.data.fill_(30.0)  # a loud image token, so the picture decides the answer
    feats = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))  # not the global RNG: other tests move it
    feats[3] = -feats[2]  # picture 3 is as unlike picture 2 as features get
    examples = _examples()
    both = answer(model, _ToyTokenizer(), examples, feats, max_new_tokens=5)
    assert both[0] == answer(model, _ToyTokenizer(), examples[:1], feats, max_new_tokens=5)[0]
    assert both[1] == answer(model, _ToyTokenizer(), examples[1:], None, max_new_tokens=5)[0]
    other = [type(examples[0])(**{**examples[0].__dict__, "image": 3})]  # the same question about another picture
    assert answer(model, _ToyTokenizer(), other, feats, max_new_tokens=5)[0] != both[0]


# ---------------------------------------------------------------------------- the demo, tiny
def tiny_train(steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=8, lr=3e-2, checkpoint=False)


def test_demo_writes_every_output(tmp_path):
    cfg = MultimodalConfig(train_scenes=120, test_scenes=4, dim=32, n_layers=2, n_heads=2, vocab_size=200,
                           pretrain_steps=3, pretrain_batch_size=4, pretrain_seq_len=64, encoder_steps=2,
                           adapter=AdapterConfig(prompt_len=10, layers=2), train=tiny_train(steps=3),
                           image_questions=40, text_questions=10, caption_examples=10, max_new_tokens=6)
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
    from adapterlab.worlds.multimodal import load_scene_base, pretrain_corpus

    monkeypatch.setenv("ADAPTERLAB_CACHE", str(tmp_path))
    cfg = MultimodalConfig(train_scenes=60, dim=32, n_layers=2, n_heads=2, vocab_size=200, pretrain_steps=2,
                           pretrain_batch_size=4, pretrain_seq_len=64)
    from adapterlab.worlds.scenes import make_scenes

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
            pretrain_batch_size=4, pretrain_seq_len=64, encoder_steps=2, image_questions=40, text_questions=10,
            caption_examples=10, max_new_tokens=6)


def test_demo_multimodal_command(tmp_path, monkeypatch, capsys):
    """`adapterlab demo --multimodal --out DIR` runs the multi-modal demo with the options it understands."""
    import dataclasses

    import adapterlab.worlds.multimodal as mm
    from adapterlab.cli import main

    monkeypatch.setenv("ADAPTERLAB_CACHE", str(tmp_path / "cache"))
    nested = {"train": (TrainConfig, lambda: tiny_train(steps=3)),
              "adapter": (AdapterConfig, lambda: AdapterConfig(prompt_len=10, layers=2))}
    tiny = dataclasses.make_dataclass("TinyConfig", [(k, type(v), dataclasses.field(default=v)) for k, v in TINY.items()]
                                      + [(k, t, dataclasses.field(default_factory=f)) for k, (t, f) in nested.items()],
                                      bases=(MultimodalConfig,))
    monkeypatch.setattr(mm, "MultimodalConfig", tiny)
    out = tmp_path / "mm"
    assert main(["demo", "--multimodal", "--out", str(out), "--steps", "4", "--prompt-len", "3", "--no-progress",
                 "--samples", "2"]) == 0
    printed = capsys.readouterr().out
    assert "config: train.steps=4, adapter.prompt_len=3" in printed and "Image-context accuracy" in printed
    saved = json.loads((out / "metrics.json").read_text())
    config = saved["multimodal_config"]
    assert (config["train"]["steps"], config["train"]["batch_size"], config["adapter"]["prompt_len"],
            config["adapter"]["layers"], config["dim"]) == (4, 8, 3, 2, 32)  # the flags on top of the tiny config
    assert json.loads((out / "gates.jsonl").read_text().splitlines()[-1])["step"] == 4
    assert len(saved["samples"]) == 2 and (out / "samples.png").is_file()

    # options that mean nothing to the multi-modal demo are refused, not silently dropped
    assert main(["demo", "--multimodal", "--out", str(out), "--gate", "layer"]) == 2
    assert "does not use --gate" in capsys.readouterr().err


def test_the_adapters_settings_leave_the_scene_base_name_alone():
    """The base's folder name hashes the base's settings only: a changed adapter budget still finds the shipped base."""
    from dataclasses import replace

    from adapterlab.worlds.multimodal import scene_base_name

    corpus = ["The red square is in the top left corner."]
    default = MultimodalConfig()
    tuned = replace(default, train=replace(default.train, steps=5, lr=1e-2), adapter=replace(default.adapter, layers=2))
    assert scene_base_name(tuned, corpus) == scene_base_name(default, corpus) != scene_base_name(replace(default, dim=64), corpus)
    assert (default.train.steps, default.train.batch_size, default.train.lr, default.train.warmup_steps) == (600, 32, 3e-2, None)
    assert (default.adapter.prompt_len, default.adapter.layers, default.adapter.visual_dim) == (10, 4, None)
