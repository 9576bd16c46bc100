"""The tree is the architecture: which folder of the package may import which (function-local imports included).

Lowest first. A module may import from its own folder and from the folders its rule names, never from above:

    metrics/                  scoring rules with an official definition (BLEU, SQuAD): nothing from adapterlab
    io/files.py               atomic writes, cache folder, lock, threads: nothing from adapterlab
    the core (top level)      model, adapter, tokenizer, data, losses, train, generate, distributed: the core and io/files
    io/                       base weights and adapter files in and out: the core
    gates/                    record, read, plot and watch the gates: the core and io
    encoders/                 other model families that reuse the adapter's Eq. 7: the core and io
    quant/                    a frozen base stored in fewer bits (int8 weight-only): the core and io
    worlds/                   the embedded worlds, their data, tasks and bases: everything above
    studies/                  one harness; baselines, variants, the studies: everything above
    exercises/                the notebooks' checkers: everything above
    faces (cli, recipes, __init__, __main__): anything
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "adapterlab"
CORE = {"model", "adapter", "tokenizer", "data", "losses", "train", "generate", "distributed"}
FACES = {"cli", "recipes", "__init__", "__main__"}
# who -> the units it may import besides its own folder (a unit is a top-level module's name or a folder's)
MAY_IMPORT = {
    "metrics": set(),
    "io.files": set(),
    "core": {"io.files"},
    "io": {"core"},
    "gates": {"core", "io"},
    "encoders": {"core", "io"},
    "quant": {"core", "io"},
    "worlds": {"core", "io", "metrics", "gates", "encoders"},
    "studies": {"core", "io", "metrics", "gates", "encoders", "worlds"},
    "exercises": {"core", "io", "metrics", "gates", "encoders", "worlds", "studies"},
}
FOLDERS = {"metrics", "io", "gates", "encoders", "quant", "worlds", "studies", "exercises"}
TOP_LEVEL_LIMIT = 12  # modules at the top of the package, faces included: the core a student reads in one sitting


def unit_of(dotted: str) -> str:
    """'io.files' -> 'io.files'; 'io.weights' -> 'io'; 'train' -> 'core'; 'cli' -> 'faces'."""
    parts = dotted.split(".")
    if dotted == "io.files":
        return "io.files"
    if parts[0] in FOLDERS:
        return parts[0]
    if parts[0] in CORE:
        return "core"
    if parts[0] in FACES:
        return "faces"
    return "unknown:" + parts[0]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def package_imports(path: Path) -> set[str]:
    """Every adapterlab module (dotted, under adapterlab) that ``path`` imports, at the top or inside a function."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" and len(here) > 0 and path.parent != PACKAGE else here[:-1]
    if path.parent == PACKAGE:
        package = []
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            module = base + (node.module.split(".") if node.module else [])
            if node.module:
                found.add(".".join(module))
            else:
                found |= {".".join(module + [a.name]) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("adapterlab"):
            rest = node.module.split(".")[1:]
            found |= {".".join(rest)} if rest else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("adapterlab.")}
    return {f for f in found if f}


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "bases" not in p.relative_to(PACKAGE).parts)


def test_every_module_lives_in_a_known_place():
    unknown = [module_name(p) for p in modules() if unit_of(module_name(p)).startswith("unknown")]
    assert unknown == [], f"put these in a folder of the tree (or add the folder to MAY_IMPORT and the README): {unknown}"


def test_the_top_level_is_the_core_and_the_faces():
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert len(top) <= TOP_LEVEL_LIMIT, f"{len(top)} modules at the top of adapterlab/: {top}"
    assert set(top) == CORE | FACES, f"the top holds the core and the faces only: {sorted(set(top) ^ (CORE | FACES))}"


def test_modules_import_only_downward():
    upward = []
    for path in modules():
        me = module_name(path)
        mine = unit_of(me)
        if mine == "faces":
            continue
        allowed = MAY_IMPORT[mine] | {mine} | ({"io.files"} if "io" in MAY_IMPORT[mine] | {mine} else set())
        for target in sorted(package_imports(path)):
            theirs = unit_of(target)
            if theirs == "faces":
                upward.append(f"{me} imports {target!r} (a face); import the name from the module that defines it")
            elif theirs not in allowed:
                upward.append(f"{me} ({mine}) imports {target} ({theirs}); {mine} may import {sorted(allowed)}")
    assert upward == [], "imports that go up or sideways:\n" + "\n".join(upward)


def test_no_import_cycles_between_modules():
    """Inside a folder modules may import each other, but not in a circle (function-local imports count)."""
    names = {module_name(p): p for p in modules()}
    graph = {}
    for name, path in names.items():
        targets = set()
        for t in package_imports(path):
            while t and t not in names:  # 'worlds.tinyworld.Recipe' -> 'worlds.tinyworld'
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name and not names[t].name == "__init__.py":
                targets.add(t)
        graph[name] = targets
    state, cycle = {}, []

    def visit(n, stack):
        state[n] = "open"
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                cycle.append(" -> ".join(stack[stack.index(m):] + [m]))
            elif m not in state:
                visit(m, stack + [m])
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert cycle == [], "import circles:\n" + "\n".join(cycle)


def test_the_checker_sees_function_local_and_relative_imports(tmp_path):
    fake = PACKAGE / "studies" / "probe_for_test.py"
    source = "import os\ndef g():\n    from ..train import train\n    from .. import gates\n    from .harness import x\n"
    tree_imports = None
    try:
        fake.write_text(source)
        tree_imports = package_imports(fake)
    finally:
        fake.unlink()
    assert tree_imports == {"train", "gates", "studies.harness"}


def test_the_rules_catch_an_upward_import():
    assert unit_of("worlds.tinyworld") == "worlds" and "worlds" not in MAY_IMPORT["core"] | {"core"}
    assert unit_of("io.files") == "io.files" and MAY_IMPORT["io.files"] == set()


def test_every_module_says_what_it_is_for():
    for path in modules():
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert len(doc.strip()) > 20, f"{path.relative_to(PACKAGE)}: say in a few docstring lines what it holds and why"
