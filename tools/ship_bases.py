"""Rebuild the pretrained bases the package ships, from scratch, and write them to adapterlab/bases/.

For maintainers: run it after changing a recipe (the tiny world's, the scene base's config, or
the text-encoder and ViT bases' where those modules exist), then commit adapterlab/bases/.
tests/test_shipped_bases.py fails until the shipped names match the current recipes.

    python tools/ship_bases.py                     # every base (about 10 minutes on one core)
    python tools/ship_bases.py --only tinyworld    # one kind

Each base is built into a fresh, empty cache folder with one CPU thread (files.BUILD_THREADS:
the same bytes on every machine of a CPU kind), compared with the copy shipped now when the
name is the same (tensors and tokenizer), and copied to adapterlab/bases/<name>/. Shipped
folders of the same kind with another name (an old recipe's) are removed. See docs/bases.md.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from adapterlab.io.files import SHIPPED_ROOT, publish_folder  # noqa: E402


# --------------------------------------------------------------------------- the builders, one per kind of base
def build_tinyworld(progress: bool) -> Path:
    from adapterlab.worlds import tinyworld

    return tinyworld.build_base(progress=progress, force=True)


def build_scenes(progress: bool) -> Path:
    from adapterlab.worlds import multimodal

    config = multimodal.MultimodalConfig()
    corpus = multimodal.make_data(config).corpus
    return multimodal.build_scene_base(corpus, config, progress=progress, force=True)


def optional_builder(module: str, function: str) -> Optional[Callable[[bool], Path]]:
    """A builder from another module of the package, if this checkout has it."""
    try:
        build = getattr(__import__(f"adapterlab.{module}", fromlist=[function]), function)
    except (ImportError, AttributeError):
        return None
    return lambda progress: build(progress=progress, force=True)


def builders() -> dict[str, Callable[[bool], Path]]:
    found = {"tinyworld": build_tinyworld, "scenes": build_scenes,
             "textenc": optional_builder("textqa", "build_text_base"),
             "vit": optional_builder("vtab", "build_vit_base")}
    return {kind: build for kind, build in found.items() if build is not None}


# --------------------------------------------------------------------------- comparing and copying folders
def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a base folder (safetensors or Meta .pth files)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    for f in sorted(folder.glob("*.pth")):
        out.update({f"{f.name}:{k}": v for k, v in torch.load(f, map_location="cpu", weights_only=True).items()})
    return out


def compare(new: Path, old: Path) -> str:
    """One line: are the two folders' tensors and tokenizer files identical?"""
    a, b = tensors(new), tensors(old)
    if set(a) != set(b):
        return f"different tensor names ({sorted(set(a) ^ set(b))[:4]} ...)"
    differ = {k: (a[k].float() - b[k].float()).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    tokenizers = [f.name for f in new.glob("*.model") if (old / f.name).read_bytes() != f.read_bytes()]
    if not differ and not tokenizers:
        return f"identical to the shipped copy ({len(a)} tensors torch.equal, tokenizer bytes equal)"
    worst = max(differ.items(), key=lambda kv: kv[1]) if differ else ("-", 0.0)
    return (f"DIFFERS from the shipped copy: {len(differ)} of {len(a)} tensors (largest |diff| {worst[1]:.3g} "
            f"in {worst[0]}); tokenizer files differing: {tokenizers or 'none'}")


def ship(built: Path) -> Path:
    """Copy a built folder to adapterlab/bases/<its name>, replacing any copy there (atomically)."""
    files = [f for f in built.iterdir() if f.is_file() and not f.name.startswith(".")]

    def write(tmp: Path) -> None:
        for f in files:
            shutil.copyfile(f, tmp / f.name)

    return publish_folder(SHIPPED_ROOT / built.name, write)


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


# --------------------------------------------------------------------------- the command
def main(argv: Optional[list[str]] = None) -> int:
    available = builders()
    parser = argparse.ArgumentParser(
        description="Rebuild the shipped pretrained bases from scratch (one CPU thread, an empty cache) and write "
                    "them to adapterlab/bases/<name>/, removing the same kind's stale folders. See docs/bases.md.")
    parser.add_argument("--only", default=",".join(available),
                        help=f"comma-separated kinds to rebuild (default: all this checkout has: {','.join(available)})")
    parser.add_argument("--cache", default=None,
                        help="build into this (empty) cache folder and keep it (default: a temporary one, removed)")
    parser.add_argument("--dry-run", action="store_true", help="build and compare, but leave adapterlab/bases/ alone")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(available))
    if unknown:
        parser.error(f"--only: unknown kind(s) {unknown}; this checkout builds {sorted(available)}")

    cache = Path(args.cache) if args.cache else Path(tempfile.mkdtemp(prefix="adapterlab-ship-"))
    if cache.exists() and any(cache.iterdir()):
        parser.error(f"--cache {cache} is not empty; give an empty or new folder so that every base is built anew")
    os.environ["ADAPTERLAB_CACHE"] = str(cache)  # the builders read it at call time: nothing old is reused
    SHIPPED_ROOT.mkdir(exist_ok=True)
    try:
        for kind in kinds:
            t0 = time.perf_counter()
            built = available[kind](not args.no_progress)
            seconds = time.perf_counter() - t0
            old = SHIPPED_ROOT / built.name
            verdict = compare(built, old) if old.is_dir() else "new (no shipped copy of this name)"
            print(f"{kind}: built {built.name} in {seconds:.0f} s; {verdict}")
            if args.dry_run:
                continue
            shipped = ship(built)
            stale = [f for f in SHIPPED_ROOT.glob(f"{kind}-*") if f.is_dir() and f.name != built.name]
            for f in stale:
                shutil.rmtree(f)
            print(f"  shipped {shipped.relative_to(ROOT)} ({folder_size(shipped) / 1e6:.2f} MB)"
                  + (f"; removed stale {', '.join(f.name for f in stale)}" if stale else ""))
    finally:
        if not args.cache:
            shutil.rmtree(cache, ignore_errors=True)
    total = sum(folder_size(f) for f in SHIPPED_ROOT.iterdir() if f.is_dir())
    print(f"adapterlab/bases/ now holds {sorted(f.name for f in SHIPPED_ROOT.iterdir() if f.is_dir())} "
          f"({total / 1e6:.2f} MB in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
