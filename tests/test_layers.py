"""The package's modules import only downward (function-local imports included).

Lowest layer first; a module may import from any *lower* layer, never from its own or a higher one.
The core a student reads is model -> adapter -> data/losses -> train -> generate; the rest is tooling.
"""
import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "adapterlab"
LAYERS = [
    {"files"},
    {"model", "tokenizer", "scenes", "bleu", "squad"},
    {"adapter", "scenetext"},
    {"data", "distributed", "encoders", "clip"},
    {"losses", "generate", "gates"},
    {"train"},
    {"checkpoints", "baselines", "vision"},
    {"tinyworld", "multimodal", "live", "vtab"},
    {"recipes", "ablate", "textqa"},
    {"families"},
    {"cli", "exercises"},
]
LAYER_OF = {m: i for i, layer in enumerate(LAYERS) for m in layer}


def package_imports(path: Path) -> set[str]:
    """Every adapterlab module that ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("adapterlab."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("adapterlab.")}
    return found


def test_every_module_has_a_layer():
    modules = {p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("__")}
    assert modules - set(LAYER_OF) == set(), "add the new module to LAYERS (and to the README's reading map)"


def test_modules_import_only_downward():
    upward = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.stem.startswith("__"):
            continue
        for target in package_imports(path):
            if target not in LAYER_OF:  # a name from the package's __init__, which imports the top layers
                upward.append(f"{path.stem} imports {target!r} from the package root; import it from its module")
            elif LAYER_OF[target] >= LAYER_OF[path.stem]:
                upward.append(f"{path.stem} (layer {LAYER_OF[path.stem]}) imports {target} (layer {LAYER_OF[target]})")
    assert upward == [], "imports that go up or sideways:\n" + "\n".join(upward)


def test_the_checker_sees_function_local_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\ndef g():\n    from .train import train\n    from . import gates\n")
    assert package_imports(f) == {"train", "gates"}


def test_every_module_says_what_it_is_for_and_its_layer():
    for path in sorted(PACKAGE.glob("*.py")):
        if path.stem.startswith("__"):
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        head = "\n".join(doc.split("\n")[:12])
        assert re.search(r"\bLayer\b", head), f"{path.name}: say in its first docstring lines what it is for and its layer"
