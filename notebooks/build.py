"""Build adapterlab notebooks from percent-format sources, execute them, keep only checked outputs.

    python notebooks/build.py notebooks/src/02_llama_from_blocks.py [--no-exec]

Policy: every cell is executed at build time (so errors surface); the saved notebook keeps the
outputs of cells marked `# NBVAL_CHECK_OUTPUT` only (the facts nbval compares); all other
outputs are cleared so files stay small and diffs readable. Cell ids are deterministic.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]  # the repository root
MARK = "NBVAL_CHECK_OUTPUT"


def parse(src: str) -> list[nbformat.NotebookNode]:
    cells, kind, buf = [], None, []

    def flush():
        if kind is None:
            return
        text = "\n".join(buf).strip("\n")
        if not text:
            return
        if kind == "markdown":
            lines = [l[2:] if l.startswith("# ") else l.lstrip("#") for l in text.split("\n")]
            cells.append(nbformat.v4.new_markdown_cell("\n".join(lines)))
        else:
            cells.append(nbformat.v4.new_code_cell(text))

    for line in src.split("\n"):
        if line.startswith("# %%"):
            flush()
            kind, buf = ("markdown" if "[markdown]" in line else "code"), []
        else:
            buf.append(line)
    flush()
    for i, c in enumerate(cells):
        c["id"] = f"c{i:03d}"
    return cells


def build(src_path: Path, execute: bool = True) -> float:
    rel = src_path.relative_to(Path(__file__).parent / "src")
    out_path = REPO / "notebooks" / rel.with_suffix(".ipynb")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    nb = nbformat.v4.new_notebook()
    nb.nbformat_minor = 5
    nb.cells = parse(src_path.read_text())
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    elapsed = 0.0
    if execute:
        t0 = time.time()
        NotebookClient(nb, timeout=900, kernel_name="python3",
                       resources={"metadata": {"path": str(out_path.parent)}}).execute()
        elapsed = time.time() - t0
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    if execute:  # keep a full copy with images for review
        review = Path("/tmp/nbsrc/review") / rel.with_suffix("")
        review.mkdir(parents=True, exist_ok=True)
        import base64
        nbformat.write(nb, review.with_suffix(".full.ipynb"))
        n = 0
        for i, cell in enumerate(nb.cells):
            for o in cell.get("outputs", []):
                if "image/png" in o.get("data", {}):
                    n += 1
                    (review / f"cell{i:02d}_{n}.png").write_bytes(base64.b64decode(o["data"]["image/png"]))
    if execute:  # report the slow cells (nbclient records timings in the cell metadata)
        from datetime import datetime
        slow = []
        for cell in nb.cells:
            ex = cell.metadata.get("execution", {})
            if "iopub.execute_input" in ex and "shell.execute_reply" in ex:
                t = (datetime.fromisoformat(ex["shell.execute_reply"].replace("Z", "+00:00"))
                     - datetime.fromisoformat(ex["iopub.execute_input"].replace("Z", "+00:00"))).total_seconds()
                slow.append((t, cell.source.strip().split("\n")[0 if not cell.source.startswith("#") else 1][:60]))
        for t, first in sorted(slow, reverse=True)[:4]:
            print(f"   {t:6.1f}s  {first}")
    count = 0
    for cell in nb.cells:
        cell.metadata = {}
        if cell.cell_type != "code":
            continue
        count += 1
        cell.execution_count = None
        if MARK not in cell.source:
            cell.outputs = []
            continue
        cell.execution_count = count  # nbval skips reference cells that look unrun
        for o in cell.outputs:
            if o.get("name") == "stderr":
                raise SystemExit(f"{out_path.name}: checked cell writes to stderr:\n{cell.source}\n{o['text']}")
            if "data" in o and any(k.startswith("image/") for k in o["data"]):
                raise SystemExit(f"{out_path.name}: checked cell shows an image:\n{cell.source}")
            if o.get("output_type") in ("execute_result", "display_data"):
                o["metadata"] = {}
            if o.get("output_type") == "execute_result":
                o["execution_count"] = count
    nbformat.validate(nb)
    nbformat.write(nb, out_path)
    size = out_path.stat().st_size
    print(f"{out_path.relative_to(REPO)}: {len(nb.cells)} cells, {size / 1024:.1f} KB, executed in {elapsed:.1f}s")
    return elapsed


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("sources", nargs="+", type=Path)
    ap.add_argument("--no-exec", action="store_true")
    args = ap.parse_args()
    for s in args.sources:
        build(s.resolve(), execute=not args.no_exec)
