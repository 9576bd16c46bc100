"""The tiny world: deterministic world/corpus/tokenizer/pretraining, held-out split, scoring, the cache."""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from adapterlab.worlds import tinyworld as tw

REPO = Path(__file__).resolve().parents[1]

# A world and model small enough to pretrain in a second (for the cache and determinism tests).
SMALL = dict(world=dict(seed=3, n_people=8, n_heldout=2, corpus_passes=2),
             model=dict(dim=32, n_layers=1, n_heads=2, multiple_of=16, max_seq_len=64),
             vocab_size=200, seq_len=32, steps=3, batch_size=4, warmup_steps=1)


def small_recipe() -> tw.Recipe:
    spec = dict(SMALL)
    return tw.Recipe(world=tw.WorldConfig(**spec.pop("world")), **spec)


def test_world_and_corpus_are_deterministic():
    assert tw.make_world(5).to_dict() == tw.make_world(5).to_dict()
    assert tw.make_world(5).to_dict() != tw.make_world(6).to_dict()
    w = tw.make_world(0)
    assert tw.pretrain_corpus(w, passes=3) == tw.pretrain_corpus(w, passes=3)
    assert tw.instruction_set(w) == tw.instruction_set(w)
    names = [p.name for p in w.people]
    assert len(set(names)) == len(names) == 40 and len(w.heldout) == 12


def test_heldout_people_are_only_in_the_pretraining_corpus():
    w = tw.make_world(0)
    train, heldout = tw.instruction_set(w)
    corpus = " ".join(tw.pretrain_corpus(w, passes=24))
    for name in w.heldout:
        pattern = re.compile(rf"\b{name}\b")
        assert not any(pattern.search(r["instruction"] + " " + r["input"] + " " + r["output"]) for r in train), name
        assert pattern.search(corpus)
    assert {r["name"] for r in heldout} == set(w.heldout) and len(heldout) == len(tw.ATTRIBUTES) * len(w.heldout)
    for r in heldout:  # every held-out fact is stated in the corpus, and as an answer to a question
        p = w.person(r["name"])
        assert tw.ANSWERS[r["attribute"]].format(n=p.name, v=r["answer"], a=tw.article(r["answer"])) in corpus


def test_instruction_set_is_alpaca_with_some_inputs():
    train, heldout = tw.instruction_set(tw.make_world(0))
    for r in train + heldout:
        assert all(isinstance(r[k], str) for k in ("instruction", "input", "output"))
    share = sum(bool(r["input"]) for r in train) / len(train)
    assert 0.3 < share < 0.5  # Alpaca-52K: about 40% with an input
    r = heldout[0]
    assert r["answer"] in r["output"] and r["answer"] not in r["alternatives"]
    assert len(r["alternatives"]) == len(tw.ATTRIBUTES[r["attribute"]]) - 1


def test_tokenizer_is_deterministic_with_llamas_special_ids():
    w = tw.make_world(0)
    corpus = tw.pretrain_corpus(w, passes=2)
    records = sum(tw.instruction_set(w), [])
    a = tw.train_tokenizer(corpus, records, 300)
    b = tw.train_tokenizer(corpus, records, 300)
    assert a.model_proto == b.model_proto
    assert (a.unk_id, a.bos_id, a.eos_id, a.pad_id, a.n_words) == (0, 1, 2, -1, 300)
    ids = a.encode("Ada lives in Oslo.", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and a.decode(ids) == "Ada lives in Oslo."
    assert 0 not in a.encode("### Instruction:\nTell me where Ada lives.")  # the template has real tokens


@pytest.mark.parametrize("answer, ok", [
    ("Ada lives in Oslo.", True),
    ("oslo", True),
    ("Ada lives in Oslo or Paris.", False),  # a conflicting value
    ("Ada lives in Paris. Ada lives in Oslo.", False),  # only the first sentence counts
    ("Ada lives in Osloville.", False),  # whole words only
    ("", False),
])
def test_answer_scoring(answer, ok):
    assert tw.answer_is_correct(answer, "Oslo", ["Paris", "Lima"]) is ok


def test_recipe_key_changes_with_anything_that_changes_the_base(monkeypatch):
    r = tw.Recipe()
    key = r.key("abc")
    assert key == tw.Recipe().key("abc")
    assert tw.Recipe(steps=r.steps + 1).key("abc") != key
    assert r.key("abd") != key  # another corpus
    monkeypatch.setattr(tw, "RECIPE_VERSION", tw.RECIPE_VERSION + 1)
    assert r.key("abc") != key  # another version of the code


def test_pretraining_is_deterministic():
    torch.set_num_threads(1)
    a, tok_a, _ = tw.pretrain(small_recipe(), progress=False)
    b, tok_b, _ = tw.pretrain(small_recipe(), progress=False)
    assert tok_a.model_proto == tok_b.model_proto
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


BUILD = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    from test_tinyworld import small_recipe
    from adapterlab.worlds import tinyworld as tw
    folder = tw.build_base(small_recipe(), progress=True)
    model = tw.load_base(recipe=small_recipe(), progress=False)
    print("FOLDER", folder, model.num_params(), model.tokenizer.n_words)
""")


def test_concurrent_first_uses_build_the_cache_once(tmp_path):
    env = dict(os.environ, ADAPTERLAB_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    script = tmp_path / "build.py"
    script.write_text(BUILD.format(tests=str(REPO / "tests")))
    procs = [subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    folders = {line for out in outs for line in out.splitlines() if line.startswith("FOLDER")}
    assert len(folders) == 1  # everyone got the same folder, model and tokenizer
    assert sum(out.count("Building the tiny-world base") for out in outs) == 1  # built once, the others waited
    cache = tmp_path / "cache"
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == [tw.base_dir(small_recipe()).name]
    info = json.loads(next(cache.glob("tinyworld-*/tinyworld.json")).read_text())
    assert info["recipe"]["steps"] == 3 and info["key"].startswith("tinyworld-")


# --------------------------------------------------------------------------- the real base (cached)
@pytest.fixture(scope="session")
def tiny_base():
    """The default pretrained base, from the cache (built here on first use: about 2 minutes)."""
    return tw.load_base()


@pytest.mark.slow
def test_default_base_knows_the_world_but_does_not_follow_instructions(tiny_base):
    assert tiny_base.tokenizer is not None and not any(p.requires_grad for p in tiny_base.parameters())
    world, train, heldout = tw.load_world()
    probe = tw.probe_base(tiny_base, tiny_base.tokenizer, world.heldout_people)
    assert set(probe) == set(tw.ATTRIBUTES)
    assert sum(probe.values()) / len(probe) >= 0.75, probe  # scored in its own words, it knows the held-out people
    before = tw.heldout_accuracy(tiny_base, tiny_base.tokenizer, heldout)
    assert before <= 0.4, before  # asked through the Alpaca template, it mostly does not answer


@pytest.mark.slow
def test_load_llama_tinyworld_is_the_frozen_cached_base_on_the_cpu(tiny_base):
    from adapterlab import load_llama

    model = load_llama("tinyworld")
    assert model.device.type == "cpu" and not model.training and not any(p.requires_grad for p in model.parameters())
    for (k, a), b in zip(model.state_dict().items(), tiny_base.state_dict().values()):
        assert torch.equal(a, b), k
    assert model.tokenizer.model_proto == tiny_base.tokenizer.model_proto


# --------------------------------------------------------------------------- names and batching
def test_answer_questions_generates_batch_size_prompts_at_a_time(monkeypatch):
    calls = []

    def fake_generate(model, tokenizer, prompts, max_new_tokens, greedy):
        calls.append(len(prompts))
        assert greedy and max_new_tokens == 5
        return [f"answer {len(calls)}"] * len(prompts)

    monkeypatch.setattr(tw, "generate", fake_generate)
    _, heldout = tw.instruction_set(tw.make_world(0))  # 60 records
    answers = tw.answer_questions(None, None, heldout[:23], max_new_tokens=5, batch_size=10)
    assert calls == [10, 10, 3] and answers[0] == "answer 1" and answers[-1] == "answer 3" and len(answers) == 23
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        tw.answer_questions(None, None, heldout, batch_size=0)


def test_load_instruction_data_reads_the_name_and_alpaca_files(tmp_path):
    from adapterlab.data import DataError, save_alpaca

    world = tw.make_world(4)
    assert tw.load_instruction_data("tinyworld") == tw.instruction_set(tw.make_world())[0]
    assert tw.load_instruction_data("tinyworld", world) == tw.instruction_set(world)[0]
    records = [{"instruction": "Say hi.", "input": "", "output": "Hi."}]
    save_alpaca(records, tmp_path / "a.json")
    assert tw.load_instruction_data(tmp_path / "a.json") == records
    with pytest.raises(DataError):
        tw.load_instruction_data(tmp_path / "missing.json")
