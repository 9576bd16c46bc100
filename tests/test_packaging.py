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
    cmd = "python -m pytest tests --nbval-lax --nbval-current-env notebooks"
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
    """notebooks/*.ipynb (and solutions/) hold exactly the cells of notebooks/src/*.py: edit the
    source, then rebuild with `python notebooks/build.py notebooks/src/<name>.py`."""
    import nbformat

    build = _builder()
    stored = sorted((ROOT / "notebooks").glob("*.ipynb")) + sorted((ROOT / "notebooks" / "solutions").glob("*.ipynb"))
    assert len(stored) >= 20
    for nb_path in stored:
        rel = nb_path.relative_to(ROOT / "notebooks").with_suffix(".py")
        src = ROOT / "notebooks" / "src" / rel
        assert src.is_file(), f"{nb_path.name} has no source {src.relative_to(ROOT)}"
        want = [(c.cell_type, c.source) for c in build.parse(src.read_text())]
        have = [(c.cell_type, c.source) for c in nbformat.read(nb_path, as_version=4).cells]
        assert have == want, f"{nb_path.relative_to(ROOT)} differs from {src.relative_to(ROOT)}: rebuild it"


def test_files_the_notebooks_cite_exist():
    """A path in backquotes in a notebook source (`docs/method.md`, `adapterlab/tinyworld.py`, ...) is a file here."""
    cited = re.compile(r"`((?:docs|adapterlab|notebooks|tests|benchmarks)/[^`\s]+\.(?:md|py|ipynb|json|png))`")
    missing = [f"{src.relative_to(ROOT)}: {path}" for src in sorted((ROOT / "notebooks" / "src").rglob("*.py"))
               for path in cited.findall(src.read_text()) if not (ROOT / path).is_file()]
    assert missing == [], "notebooks cite files the repository does not have"
