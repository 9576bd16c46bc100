"""The pretrained bases the package ships (adapterlab/bases/<name>/): the current recipes' names,
loaded exactly as stored, working, and reproducible from the recipe (docs/bases.md).

The fast checks re-run the first pretraining steps of each base at one thread and compare their
losses with the ones the shipping build recorded. The full rebuild runs only when asked:
ADAPTERLAB_REBUILD_BASES=1 (about 10 minutes on one core).
"""
import fnmatch
import json
import os
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapterlab.worlds import multimodal as mm
from adapterlab.worlds import tinyworld as tw
from adapterlab.io.files import BUILD_THREADS, SHIPPED_ROOT, build_machine, cpu_threads, shipped_base

ROOT = Path(__file__).resolve().parents[1]
RESHIP = "the recipe changed: rebuild and ship with `python tools/ship_bases.py --only {kind}`, then commit adapterlab/bases/"
REBUILD = os.environ.get("ADAPTERLAB_REBUILD_BASES") == "1"


@pytest.fixture(scope="module")
def scene_corpus() -> list[str]:
    return mm.make_data(mm.MultimodalConfig()).corpus


def shipped_folder(kind: str, name: str) -> Path:
    """The shipped folder of a kind; fails, telling the maintainer what to do, unless it is ``name``."""
    found = sorted(p.name for p in SHIPPED_ROOT.glob(f"{kind}-*") if p.is_dir())
    assert found == [name], f"adapterlab/bases/ ships {found}, the current recipe's base is {name}: " + RESHIP.format(kind=kind)
    return shipped_base(name)


def stored_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "consolidated.00.safetensors"))


def same_losses(now: list[float], info: dict, what: str) -> None:
    """Bit-for-bit where this machine computes as the building one did (same torch, same CPU
    vector unit, one thread); elsewhere float rounding may differ in the last digits."""
    shipped = info["first_losses"]
    assert len(now) == len(shipped) > 0
    if build_machine() == info["built_with"]:
        assert now == shipped, f"{what}: the first {len(now)} pretraining losses differ from the shipped build's; " + \
            RESHIP.format(kind=what)
    else:  # another torch or CPU kind: the same recipe, rounded differently
        torch.testing.assert_close(torch.tensor(now), torch.tensor(shipped), rtol=1e-3, atol=0,
                                   msg=f"{what}: first losses far from the shipped build's ({info['built_with']})")


# --------------------------------------------------------------------------- what is shipped
def test_shipped_bases_are_the_current_recipes(scene_corpus):
    shipped_folder("tinyworld", tw.base_name())
    shipped_folder("scenes", mm.scene_base_name(mm.MultimodalConfig(), scene_corpus))


def test_encoder_bases_ship_and_load_without_building(tmp_path, monkeypatch):
    from adapterlab.worlds import textqa, vtab

    monkeypatch.setenv("ADAPTERLAB_CACHE", str(tmp_path / "cache"))
    shipped_folder("vit", vtab.vit_base_name())
    shipped_folder("textenc", textqa.text_base_name())
    vit, text = vtab.load_vit_base(progress=False), textqa.load_text_base()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir()), "a shipped base was rebuilt"
    assert not any(p.requires_grad for p in vit.parameters()) and not any(p.requires_grad for p in text.parameters())


def test_shipped_folders_hold_safetensors_json_and_tokenizers_only_and_are_packaged():
    folders = [p for p in SHIPPED_ROOT.iterdir() if p.is_dir()]
    assert folders
    pattern = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["adapterlab"]
    for folder in folders:
        for f in folder.rglob("*"):
            assert f.is_file() and f.suffix in (".safetensors", ".json", ".model"), f"{f}: ship no pickles, no folders"
            relative = f.relative_to(SHIPPED_ROOT.parent).as_posix()
            assert any(fnmatch.fnmatch(relative, p) for p in pattern), f"{relative} is left out of the wheel by {pattern}"
    total = sum(f.stat().st_size for folder in folders for f in folder.iterdir())
    assert total < 30e6, f"adapterlab/bases/ holds {total / 1e6:.1f} MB; the package should stay small"


# --------------------------------------------------------------------------- loading: exactly the stored files, nothing built
def test_tiny_world_base_loads_from_the_package_and_knows_its_world(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERLAB_CACHE", str(tmp_path / "cache"))
    folder = shipped_folder("tinyworld", tw.base_name())
    assert tw.base_dir() == folder and tw.build_base(progress=False) == folder
    model = tw.load_llama("tinyworld")
    stored = stored_tensors(folder)
    assert stored.keys() == model.state_dict().keys()
    assert all(torch.equal(v, stored[k]) for k, v in model.state_dict().items())
    assert model.tokenizer.model_proto == (folder / "tokenizer.model").read_bytes()
    assert not (tmp_path / "cache").exists()  # nothing was built or cached
    world, _, _ = tw.load_world()
    probe = tw.probe_base(model, model.tokenizer, world.heldout_people)  # facts only pretraining stated
    assert sum(probe.values()) / len(probe) > 0.8, probe
    _, asked = tw.instruction_set(world, style="question")  # the corpus's own question form: answered untuned
    assert tw.heldout_accuracy(model, model.tokenizer, asked) > 0.5


def test_scene_base_loads_from_the_package_and_reads_scene_text(tmp_path, monkeypatch, scene_corpus):
    monkeypatch.setenv("ADAPTERLAB_CACHE", str(tmp_path / "cache"))
    config = mm.MultimodalConfig()
    folder = shipped_folder("scenes", mm.scene_base_name(config, scene_corpus))
    model, tokenizer, info = mm.load_scene_base(scene_corpus, config, progress=False)
    assert info["shipped"] and info["cached"] and Path(info["folder"]) == folder
    stored = stored_tensors(folder)
    assert all(torch.equal(v, stored[k]) for k, v in model.state_dict().items())
    assert not (tmp_path / "cache").exists()
    docs = [tokenizer.encode(d, bos=True, eos=True)[:128] for d in scene_corpus[:32]]
    losses = [torch.nn.functional.cross_entropy(model(torch.tensor([d[:-1]]))[0], torch.tensor(d[1:])).item()
              for d in docs]
    assert sum(losses) / len(losses) < 1.0, losses  # ln(vocab) = 5.8: it has learned to read scene text


# --------------------------------------------------------------------------- reproducible from the recipe
def test_first_tiny_world_pretraining_steps_reproduce_the_shipped_build():
    folder = shipped_folder("tinyworld", tw.base_name())
    info = json.loads((folder / "tinyworld.json").read_text())
    assert info["built_with"]["threads"] == BUILD_THREADS == 1
    same_losses(tw.pretrain_prefix(), info, "tinyworld")


def test_first_scene_pretraining_steps_reproduce_the_shipped_build(scene_corpus):
    config = mm.MultimodalConfig()
    folder = shipped_folder("scenes", mm.scene_base_name(config, scene_corpus))
    info = json.loads((folder / mm.BASE_INFO).read_text())
    with cpu_threads(BUILD_THREADS):
        _, tokenizer, prefix = mm.pretrain_scene_base(scene_corpus, config, progress=False, stop_after=mm.PREFIX_STEPS)
    assert tokenizer.model_proto == (folder / "tokenizer.model").read_bytes()
    same_losses(prefix["first_losses"], info, "scenes")


def same_rounded(now: list[float], recorded: list[float], digits: int, built_with, what: str) -> None:
    """A loss history that keeps ``digits`` decimals: equal after rounding where this machine computes
    as the recording one did (same torch, same CPU vector unit, one thread), else within 1e-3."""
    now = [round(x, digits) for x in now]
    if built_with is not None and build_machine() == built_with:
        assert now == recorded, f"{what}: the first {len(now)} recorded losses differ; " + RESHIP.format(kind=what)
    else:
        torch.testing.assert_close(torch.tensor(now), torch.tensor(recorded), rtol=1e-3, atol=0,
                                   msg=f"{what}: first losses far from the recorded ones ({built_with})")


@pytest.mark.slow  # it draws the 8000 pretraining pictures first
def test_first_vit_pretraining_steps_reproduce_the_shipped_build():
    from adapterlab.worlds import vtab

    info = json.loads((shipped_folder("vit", vtab.vit_base_name()) / "vit.json").read_text())
    assert info["threads"] == BUILD_THREADS == 1
    first = tw.FirstLosses(tw.PREFIX_STEPS, stop=True)
    with cpu_threads(BUILD_THREADS), pytest.raises(tw.EnoughSteps):
        vtab.pretrain_vit(vtab.VIT_RECIPE, progress=False, callbacks=[first])
    same_rounded(first.losses, info["loss_history"][:tw.PREFIX_STEPS], 4, info.get("built_with"), "vit")


def test_first_text_encoder_pretraining_steps_reproduce_the_shipped_build():
    from adapterlab.worlds import textqa

    info = json.loads((shipped_folder("textenc", textqa.text_base_name()) / "textbase.json").read_text())
    assert info["built_with"]["threads"] == BUILD_THREADS == 1
    recorded = [[step, loss] for step, loss in info["loss_history"] if step <= 25]  # every 25th step is kept
    first = tw.FirstLosses(26, stop=True)
    with cpu_threads(BUILD_THREADS), pytest.raises(tw.EnoughSteps):
        textqa.pretrain_text_encoder(textqa.TEXT_RECIPE, progress=False, callbacks=[first])
    same_rounded([first.losses[step] for step, _ in recorded], [loss for _, loss in recorded], 4, info["built_with"],
                 "textenc")


@pytest.mark.parametrize("family", ["vit", "roberta"])
def test_first_steps_of_the_committed_family_studies_reproduce_on_the_shipped_bases(family):
    """The first final run of docs/results/families/<family>: its first steps, trained again now."""
    import copy

    from adapterlab.encoders.transformer import set_head
    from adapterlab.studies import families as fam

    folder = ROOT / "docs" / "results" / "families" / family
    results = json.loads((folder / "results.json").read_text())
    run = next(r for r in map(json.loads, (folder / "runs.jsonl").read_text().splitlines()) if r["phase"] == "final")
    settings = run["settings"]
    bench = (fam.vit_bench if family == "vit" else fam.roberta_bench)([run["task"]])
    assert bench.base_name == results["base"], "the study was run on another base: rerun it (docs/results/families)"
    task = bench.tasks[run["task"]]
    model = fam.prepare(set_head(copy.deepcopy(bench.base), task.n_out, run["seed"]), run["method"],
                        prompt_len=settings["prompt_len"], layers=settings["layers"], seed=run["seed"])
    first = tw.FirstLosses(8, stop=True)
    with cpu_threads(1), pytest.raises(tw.EnoughSteps):
        fam.fit(model, task, fam.training_examples(task, final=True), steps=settings["steps"],
                batch_size=settings["batch_size"], lr=run["lr"], warmup_steps=settings["warmup_steps"],
                weight_decay=settings["weight_decay"], seed=run["seed"], callbacks=[first])
    assert first.losses[0] == pytest.approx(run["first_loss"], rel=1e-6)
    same_rounded(first.losses, run["losses"][:8], 5, None, f"families/{family}")


@pytest.mark.skipif(not REBUILD, reason="the full rebuild of the shipped bases takes about 10 minutes on one core; "
                                        "run with ADAPTERLAB_REBUILD_BASES=1")
def test_a_fresh_build_equals_the_shipped_bases(tmp_path, monkeypatch, scene_corpus):
    monkeypatch.setenv("ADAPTERLAB_CACHE", str(tmp_path))
    config = mm.MultimodalConfig()
    for kind, built in (("tinyworld", tw.build_base(progress=False, force=True)),
                        ("scenes", mm.build_scene_base(scene_corpus, config, progress=False, force=True))):
        shipped = shipped_folder(kind, built.name)
        assert built.parent == tmp_path
        new, old = stored_tensors(built), stored_tensors(shipped)
        assert new.keys() == old.keys()
        differ = [k for k in new if not torch.equal(new[k], old[k])]
        assert not differ, f"{kind}: a fresh build differs from the shipped one in {differ[:5]}"
        assert (built / "tokenizer.model").read_bytes() == (shipped / "tokenizer.model").read_bytes()
