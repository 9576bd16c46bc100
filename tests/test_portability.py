"""The package needs no POSIX-only module: with ``fcntl`` unimportable (as on Windows) the CLI imports,
and the tiny-world base is built, published into the cache under its lock, and loaded."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from adapterlab.worlds import tinyworld as tw
from adapterlab.io.files import cache_root

REPO = Path(__file__).resolve().parents[1]

# sys.modules[name] = None makes `import name` raise ImportError, as on a system without it.
WITHOUT_FCNTL = textwrap.dedent("""
    import sys
    sys.modules["fcntl"] = None
    sys.path.insert(0, {tests!r})
    try:
        import fcntl
    except ImportError:
        print("fcntl is blocked")
    import adapterlab.cli
    from adapterlab import load_llama
    from adapterlab.worlds import tinyworld
""")

SMALL_BASE = WITHOUT_FCNTL + textwrap.dedent("""
    from test_tinyworld import small_recipe
    folder = tinyworld.build_base(small_recipe(), progress=True)   # the lock and the atomic publish
    model = load_llama(folder, device="cpu")                         # a Meta folder, by path
    print("BUILT", folder.name, model.num_params(), model.tokenizer.n_words)
    cached = tinyworld.load_base(recipe=small_recipe(), progress=False)
    print("CACHED", cached.num_params(), any(p.requires_grad for p in cached.parameters()))
""")

DEFAULT_BASE = WITHOUT_FCNTL + textwrap.dedent("""
    model = load_llama("tinyworld")
    print("LOADED", model.num_params(), model.tokenizer.n_words)
""")


def run_without_fcntl(script: str, tmp_path: Path, cache: Path) -> str:
    path = tmp_path / "script.py"
    path.write_text(script.format(tests=str(REPO / "tests")))
    env = dict(os.environ, ADAPTERLAB_CACHE=str(cache), OMP_NUM_THREADS="1", ADAPTERLAB_THREADS="1")
    done = subprocess.run([sys.executable, str(path)], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "fcntl is blocked" in done.stdout
    return done.stdout


def test_cli_imports_and_a_base_is_built_and_loaded_without_fcntl(tmp_path):
    out = run_without_fcntl(SMALL_BASE, tmp_path, tmp_path / "cache")
    assert "Building the tiny-world base" in out
    built = next(line.split() for line in out.splitlines() if line.startswith("BUILT"))
    assert built[1].startswith("tinyworld-") and (tmp_path / "cache" / built[1] / "tinyworld.json").is_file()
    cached = next(line.split() for line in out.splitlines() if line.startswith("CACHED"))
    assert cached[1:] == [built[2], "False"]  # the same model, frozen


@pytest.mark.slow
def test_load_llama_tinyworld_without_fcntl(tmp_path):
    folder = tw.build_base()  # the default base, from the user's cache (built here on first use: minutes)
    out = run_without_fcntl(DEFAULT_BASE, tmp_path, cache_root())
    model = tw.load_base()
    assert f"LOADED {model.num_params()} {model.tokenizer.n_words}" in out, (folder, out)
