"""Packaging: environment.yml offers the same packages, version floors and Python as pyproject.toml
(runtime + notebooks + dev extras), from conda-forge alone."""
import importlib.util
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"torch": "pytorch"}  # conda calls torch "pytorch"
REQUIREMENT = re.compile(r"\s*([A-Za-z0-9_.\-]+)\s*([<>=!~].*)?")


def specs(reqs) -> dict[str, str]:
    """{conda name: version spec} of requirement strings like "torch>=2.5"."""
    out = {}
    for r in reqs:
        name, spec = REQUIREMENT.fullmatch(r.split(";")[0]).groups()
        out[CONDA_NAMES.get(name.lower(), name.lower())] = (spec or "").replace(" ", "")
    return out


def environment_yml() -> tuple[list[str], dict[str, str]]:
    """(channels, {name: version spec}) of environment.yml, pip entries included."""
    text = (ROOT / "environment.yml").read_text()
    channels = re.findall(r"^\s*-\s+(\S+)", text.split("channels:", 1)[1].split("dependencies:", 1)[0], re.M)
    listed = [m.group(1) for line in text.split("dependencies:", 1)[1].splitlines()
              if (m := re.match(r"\s*-\s+([^\s:]+)\s*$", line)) and m.group(1) not in ("pip", "-e")]
    return channels, specs(listed)


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = specs(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        wanted.update(specs(extra))
    wanted["python"] = project["requires-python"]
    channels, listed = environment_yml()
    assert sorted(set(wanted) - set(listed)) == [], "missing in environment.yml"
    assert sorted(set(listed) - set(wanted)) == [], "extra in environment.yml"
    assert {n: s for n, s in listed.items() if s != wanted[n]} == {}, f"version floors differ from pyproject: {wanted}"
    # conda-forge carries PyTorch now; the "pytorch" channel receives no new releases
    assert channels == ["conda-forge", "nodefaults"], channels


def test_python_floor_is_what_the_code_and_tests_need():
    """tomllib (this file) is new in 3.11, and 3.10 reached its end of life in October 2026."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    cmd = "python -m pytest -n auto --dist loadscope tests --nbval-lax --nbval-current-env notebooks"
    assert cmd in readme and cmd in ci


def test_readme_lists_every_notebook_and_each_has_sources_and_solutions():
    notebooks = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert len(notebooks) >= 10
    readme = (ROOT / "README.md").read_text()
    listed = re.findall(r"\]\(notebooks/([^)/]+\.ipynb)\)", readme)
    assert listed == notebooks, "README.md's notebook list and notebooks/*.ipynb differ"
    for name in notebooks:
        stem = name.removesuffix(".ipynb")
        assert (ROOT / "notebooks" / "src" / f"{stem}.py").is_file(), f"{name} has no source in notebooks/src"
        assert (ROOT / "notebooks" / "solutions" / f"{stem}_solutions.ipynb").is_file(), f"{name} has no solutions"


def _builder():
    spec = importlib.util.spec_from_file_location("notebook_builder", ROOT / "notebooks" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_notebook_is_built_from_its_current_source():
    """notebooks/*.ipynb (and solutions/) hold exactly the cells of notebooks/src/*.py (their code and
    text; the outputs come from the build's run): edit the source, then rebuild with
    `python notebooks/build.py notebooks/src/<name>.py`."""
    import nbformat

    build = _builder()
    stored = _stored_notebooks()
    assert len(stored) >= 20
    for nb_path in stored:
        rel = nb_path.relative_to(ROOT / "notebooks").with_suffix(".py")
        src = ROOT / "notebooks" / "src" / rel
        assert src.is_file(), f"{nb_path.name} has no source {src.relative_to(ROOT)}"
        want = [(c.cell_type, c.source) for c in build.parse(src.read_text())]
        have = [(c.cell_type, c.source) for c in nbformat.read(nb_path, as_version=4).cells]
        assert have == want, f"{nb_path.relative_to(ROOT)} differs from {src.relative_to(ROOT)}: rebuild it"


def _stored_notebooks() -> list[Path]:
    return sorted((ROOT / "notebooks").glob("*.ipynb")) + sorted((ROOT / "notebooks" / "solutions").glob("*.ipynb"))


def test_stored_notebooks_are_executed_small_and_say_where_they_were_built():
    """Readable without running: stored with their outputs (text and figures), each under 1 MB, and
    the build record (date, machine, threads) in the metadata. Rebuild with notebooks/build.py."""
    import nbformat

    build = _builder()
    for nb_path in _stored_notebooks():
        name = nb_path.relative_to(ROOT / "notebooks")
        assert nb_path.stat().st_size < build.MAX_BYTES, f"{name} is over 1 MB: make its figures smaller"
        nb = nbformat.read(nb_path, as_version=4)
        record = nb.metadata.get("adapterlab", {})
        assert {"built", "machine", "run_seconds"} <= set(record), f"{name} has no build record: rebuild it"
        assert {"cpu", "cores", "ADAPTERLAB_THREADS", "OMP_NUM_THREADS"} <= set(record["machine"]), name
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.execution_count == i for i, c in enumerate(code, 1)), f"{name}: not executed in order"
        assert any(c.outputs for c in code), f"{name} is stored without outputs: rebuild it"


def test_stored_outputs_hold_no_warning_traceback_path_or_redraw():
    """What the builder refuses to store, checked on what is stored (and the check itself, on a bad cell)."""
    import nbformat

    build = _builder()
    bad = nbformat.v4.new_code_cell("x")
    bad.outputs = [nbformat.v4.new_output("stream", name="stderr",
                                          text="/root/x.py:3: RuntimeWarning: Mean of empty slice\n"),
                   nbformat.v4.new_output("stream", name="stdout", text="step 1\rstep 2\n")]
    assert len(build.problems(bad)) == 3  # the warning, the path, the carriage return
    found = [f"{nb_path.relative_to(ROOT)} cell {i}: {p}" for nb_path in _stored_notebooks()
             for i, cell in enumerate(nbformat.read(nb_path, as_version=4).cells) for p in build.problems(cell)]
    assert found == [], "stored outputs the builder would refuse: rebuild these notebooks"


def test_builder_stores_widgets_as_what_they_showed():
    """A tqdm bar widget becomes its final line; an Output widget (the gate explorer) its figures;
    carriage-return redraws keep their last state; the home folder becomes ~."""
    import nbformat

    build = _builder()
    html = lambda value: {"model_name": "HTMLModel", "state": {"value": value}}  # noqa: E731
    state = {"bar": {"model_name": "HBoxModel", "state": {"children": ["IPY_MODEL_l", "IPY_MODEL_p", "IPY_MODEL_r"]}},
             "l": html("train: 100%"), "p": {"model_name": "FloatProgressModel", "state": {"value": 5}},
             "r": html("&nbsp;5/5 [00:01&lt;00:00]"),
             "box": {"model_name": "VBoxModel", "state": {"children": ["IPY_MODEL_slider", "IPY_MODEL_out"]}},
             "slider": {"model_name": "IntSliderModel", "state": {"value": 3}},
             "out": {"model_name": "OutputModel", "state": {"outputs": [
                 {"output_type": "display_data", "data": {"text/plain": "<Figure>"}, "metadata": {}}]}}}
    view = lambda mid: nbformat.v4.new_output("display_data", data={  # noqa: E731
        build.WIDGET: {"model_id": mid, "version_major": 2, "version_minor": 0}, "text/plain": "HBox()"})
    home = str(Path.home())
    outputs = [view("bar"), nbformat.v4.new_output("stream", name="stdout", text=f"a\rb\n{home}/x\n"), view("box")]
    cleaned = build.clean_outputs(outputs, state)
    assert len(cleaned) == 2  # the bar's line and the stream join one stdout block, as Jupyter shows them
    assert cleaned[0] == nbformat.v4.new_output("stream", name="stdout", text="train: 100% 5/5 [00:01<00:00]\nb\n~/x\n")
    assert cleaned[1]["data"] == {"text/plain": "<Figure>"}  # the explorer's figure; its slider shows nothing


def test_files_the_notebooks_cite_exist():
    """A path in backquotes in a notebook source (`docs/method.md`, `adapterlab/worlds/tinyworld.py`, ...) is a file here."""
    cited = re.compile(r"`((?:docs|adapterlab|notebooks|tests|benchmarks)/[^`\s]+\.(?:md|py|ipynb|json|png))`")
    missing = [f"{src.relative_to(ROOT)}: {path}" for src in sorted((ROOT / "notebooks" / "src").rglob("*.py"))
               for path in cited.findall(src.read_text()) if not (ROOT / path).is_file()]
    assert missing == [], "notebooks cite files the repository does not have"
