"""Build adapterlab notebooks from percent-format sources: execute them and store them with their outputs.

    python notebooks/build.py notebooks/src/02_llama_from_blocks.py [more sources ...] [--no-exec | --text-only]

Policy (notebooks/BUILDING.md):
- every cell runs at build time, and the notebook is stored **with its outputs** (text and figures),
  so it can be read on GitHub without running it; cell ids and execution counts are deterministic;
- the stored outputs are cleaned for reading: a progress-bar widget becomes its final line of text,
  the explorer widget becomes the figure it showed, figures are re-encoded as small palette PNGs,
  carriage-return redraws keep only their last state, the home folder is written ``~`` and paths
  inside the repository relative to it;
- the build fails if an output holds a warning, a traceback, an error, an absolute path of this
  machine (/work, /root, /home, /Users; temporary folders are allowed), or if a cell marked ``# NBVAL_CHECK_OUTPUT`` (compared by ``pytest --nbval-lax``)
  writes to stderr or shows a figure;
- the notebook's metadata records where and when it was built: date, machine, CPU threads, the
  wall time of the run, the kernel's CPU time (with one thread: the run's time on an idle machine)
  and the load average at the end.
"""
from __future__ import annotations

import argparse
import base64
import io
import os
import platform
import re
import resource
import sys
import time
from datetime import datetime, timezone
from html import unescape
from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]  # the repository root
SRC = Path(__file__).resolve().parent / "src"
MARK = "NBVAL_CHECK_OUTPUT"
REVIEW = Path(os.environ.get("ADAPTERLAB_NB_REVIEW", "/tmp/nbsrc/review"))  # full copies + PNGs for a human look
MAX_BYTES = 1_000_000  # a stored notebook stays well under this (tests/test_packaging.py)
WIDGET = "application/vnd.jupyter.widget-view+json"
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
# What must never be in a stored output (tests/test_packaging.py scans for the same).
FORBIDDEN = {
    "a warning": re.compile(r"\b\w*Warning\b:|\bwarnings\.warn\b"),
    "a traceback": re.compile(r"Traceback \(most recent call last\)"),
    "an absolute path of the build machine": re.compile(r"(?<![\w.~])/(?:work|root|home|Users)/"),
    "a carriage return (progress-bar redraws)": re.compile(r"\r"),
}


# --------------------------------------------------------------------------- source -> cells
def parse(src: str) -> list[nbformat.NotebookNode]:
    """Cells of a percent-format source: ``# %%`` starts a code cell, ``# %% [markdown]`` a markdown one."""
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


# --------------------------------------------------------------------------- outputs made readable
def html_text(value: str) -> str:
    return unescape(re.sub(r"<[^>]+>", "", value)).replace("\xa0", " ").replace("\u2007", " ")


def widget_outputs(model_id: str, state: dict) -> list[dict]:
    """What a widget showed, as plain outputs: an Output widget's outputs (figures), an Image
    widget's picture, an HTML widget's text, a progress bar's final line, the same for the
    children of a box; controls (sliders, pickers) show nothing."""
    widget = state.get(model_id)
    if widget is None:
        return []
    name, s = widget.get("model_name"), widget.get("state", {})
    if name == "OutputModel":
        return list(s.get("outputs", []))
    if name == "ImageModel":
        png = [b["data"] for b in widget.get("buffers", []) if b.get("path") == ["value"]]
        return [nbformat.v4.new_output("display_data", data={"image/png": png[0], "text/plain": "<image>"})
                ] if png and s.get("format", "png") == "png" else []
    if name in ("HTMLModel", "LabelModel") and html_text(s.get("value", "")).strip():
        return [nbformat.v4.new_output("stream", name="stdout", text=html_text(s["value"]).strip() + "\n")]
    children = [c.removeprefix("IPY_MODEL_") for c in s.get("children", [])]
    kinds = [state.get(c, {}).get("model_name") for c in children]
    if "FloatProgressModel" in kinds or "IntProgressModel" in kinds:  # a tqdm bar: HTML, progress, HTML
        text = "".join(html_text(state[c]["state"].get("value", "")) for c, k in zip(children, kinds) if k == "HTMLModel")
        return [nbformat.v4.new_output("stream", name="stdout", text=text.strip() + "\n")]
    return [o for c in children for o in widget_outputs(c, state)]


def last_redraw(text: str) -> str:
    """Keep what a terminal would show: for each line, the part after its last carriage return."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.replace("\r\n", "\n").split("\n"))


def small_png(data: str) -> str:
    """A figure re-encoded as a palette PNG (plots have few colours) if that is smaller and looks the
    same (mean error under 1 of 255 per channel; pictures with fine noise keep their full colours)."""
    try:
        import numpy as np
        from PIL import Image
    except ImportError:
        return data
    raw = base64.b64decode(data)
    image = Image.open(io.BytesIO(raw)).convert("RGB")
    palette = image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    error = np.abs(np.asarray(palette.convert("RGB"), dtype=np.int16) - np.asarray(image, dtype=np.int16)).mean()
    buf = io.BytesIO()
    palette.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode() if buf.tell() < len(raw) and error < 1.0 else data


def clean_outputs(outputs: list, state: dict) -> list:
    """A cell's outputs as they are stored (see the module docstring)."""
    home = str(Path.home())

    def shorten(text: str) -> str:  # paths inside the repository relative to it, the home folder as ~
        return text.replace(f"{REPO}/", "").replace(str(REPO), ".").replace(home, "~")
    out = []
    for o in outputs:
        if o.get("output_type") in ("display_data", "execute_result") and WIDGET in o.get("data", {}):
            out.extend(clean_outputs([nbformat.from_dict(x) for x in widget_outputs(o["data"][WIDGET]["model_id"],
                                                                                     state)], state))
            continue
        if o.get("output_type") == "stream":
            o["text"] = shorten(last_redraw(o["text"]))
            if out and out[-1].get("output_type") == "stream" and out[-1]["name"] == o["name"]:
                out[-1]["text"] += o["text"]  # one block per stream, as Jupyter shows it
                continue
        if "data" in o:
            o["metadata"] = {}
            data = o["data"]
            if "image/png" in data:
                data["image/png"] = small_png(data["image/png"])
            for key in ("text/plain", "text/html", "text/markdown"):
                if isinstance(data.get(key), str):
                    data[key] = shorten(data[key])
        out.append(o)
    return out


def problems(cell: nbformat.NotebookNode) -> list[str]:
    """What is wrong with a stored cell's outputs (empty: nothing)."""
    found = []
    for o in cell.get("outputs", []):
        if o.get("output_type") == "error":
            found.append(f"an error: {o.get('ename')}: {o.get('evalue')}")
            continue
        texts = [o.get("text", "")] + [v for k, v in o.get("data", {}).items() if k.startswith("text/")]
        for what, pattern in FORBIDDEN.items():
            if any(pattern.search(t if isinstance(t, str) else "".join(t)) for t in texts):
                found.append(what)
        if MARK in cell.source:
            if o.get("name") == "stderr":
                found.append(f"stderr in a checked cell: {o['text']!r}")
            if any(k.startswith("image/") for k in o.get("data", {})):
                found.append("a figure in a checked cell (nbval would compare its pixels)")
    return found


# --------------------------------------------------------------------------- where and when
def machine() -> dict:
    """The build machine in words: CPU model, cores, the thread settings, versions."""
    cpu = platform.processor() or platform.machine()
    try:
        names = [l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                 if l.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "system": platform.system(),
            "ADAPTERLAB_THREADS": os.environ.get("ADAPTERLAB_THREADS", "(unset: 1)"),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "(unset)"),
            "python": platform.python_version(), "torch": torch.__version__,
            # the vector unit torch uses: another one (AVX2 vs AVX-512) rounds sums differently, so
            # training ends elsewhere even at the same seed and thread count
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


# --------------------------------------------------------------------------- build
def children_cpu_seconds() -> float:
    """CPU time of the finished child processes (the kernel, once shut down). With one torch
    thread it is close to the wall time the run takes on an idle machine, whatever the load now."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def slow_cells(nb: nbformat.NotebookNode, n: int = 4) -> list[tuple[float, str]]:
    """The n slowest cells (nbclient records timings in the cell metadata)."""
    slow = []
    for cell in nb.cells:
        ex = cell.metadata.get("execution", {})
        if "iopub.execute_input" in ex and "shell.execute_reply" in ex:
            t = (datetime.fromisoformat(ex["shell.execute_reply"].replace("Z", "+00:00"))
                 - datetime.fromisoformat(ex["iopub.execute_input"].replace("Z", "+00:00"))).total_seconds()
            lines = cell.source.strip().split("\n")
            slow.append((t, lines[1 if lines[0].startswith("#") and len(lines) > 1 else 0][:60]))
    return sorted(slow, reverse=True)[:n]


def review_copy(nb: nbformat.NotebookNode, rel: Path) -> None:
    """The stored notebook's figures as PNG files under REVIEW, to look at them without Jupyter."""
    folder = REVIEW / rel.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    n = 0
    for i, cell in enumerate(nb.cells):
        for o in cell.get("outputs", []):
            if "image/png" in o.get("data", {}):
                n += 1
                (folder / f"cell{i:02d}_{n}.png").write_bytes(base64.b64decode(o["data"]["image/png"]))


def reuse_outputs(nb: nbformat.NotebookNode, out_path: Path) -> bool:
    """Give ``nb`` the outputs and build record of the stored notebook if their code cells are the
    same (only the text changed, so a run would print the same); False if they differ."""
    if not out_path.is_file():
        return False
    stored = nbformat.read(out_path, as_version=4)
    code = lambda book: [c for c in book.cells if c.cell_type == "code"]  # noqa: E731
    if [c.source for c in code(stored)] != [c.source for c in code(nb)] or "adapterlab" not in stored.metadata:
        return False
    for new, old in zip(code(nb), code(stored)):
        new.outputs, new.execution_count = old.outputs, old.execution_count
    nb.metadata["adapterlab"] = stored.metadata["adapterlab"]
    return True


def build(src_path: Path, execute: bool = True, text_only: bool = False) -> float:
    rel = src_path.relative_to(SRC)
    out_path = REPO / "notebooks" / rel.with_suffix(".ipynb")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    nb = nbformat.v4.new_notebook()
    nb.nbformat_minor = 5
    nb.cells = parse(src_path.read_text())
    nb.metadata = {"kernelspec": KERNELSPEC, "language_info": {"name": "python"}}
    if text_only:
        if not reuse_outputs(nb, out_path):
            raise SystemExit(f"{out_path.relative_to(REPO)}: --text-only needs a stored, executed notebook with the "
                             "same code cells as the source; the code changed, so run it (without --text-only)")
        nbformat.validate(nb)
        nbformat.write(nb, out_path)
        print(f"{out_path.relative_to(REPO)}: text updated, outputs kept from the build of "
              f"{nb.metadata['adapterlab']['built']}")
        return 0.0
    elapsed = cpu = 0.0
    if execute:
        started = datetime.now(timezone.utc)
        t0, cpu0 = time.time(), children_cpu_seconds()
        NotebookClient(nb, timeout=900, kernel_name="python3", store_widget_state=True,
                       resources={"metadata": {"path": str(out_path.parent)}}).execute()
        elapsed, cpu = time.time() - t0, children_cpu_seconds() - cpu0
        for t, first in slow_cells(nb):
            print(f"   {t:6.1f}s  {first}")
        state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    nb.metadata = {"kernelspec": KERNELSPEC, "language_info": {"name": "python"}}
    if execute:
        nb.metadata["adapterlab"] = {"built": started.strftime("%Y-%m-%d %H:%M UTC"),
                                     "run_seconds": round(elapsed, 1), "kernel_cpu_seconds": round(cpu, 1),
                                     "load_average": round(os.getloadavg()[0], 1), "machine": machine(),
                                     "command": f"python notebooks/build.py notebooks/src/{rel.as_posix()}"}
    count, bad = 0, []
    for cell in nb.cells:
        cell.metadata = {}
        if cell.cell_type != "code":
            continue
        count += 1
        cell.execution_count = count if execute else None
        cell.outputs = clean_outputs(cell.outputs, state) if execute else []
        for o in cell.outputs:
            if o.get("output_type") == "execute_result":
                o["execution_count"] = count
        bad += [f"cell {count}: {p}\n{cell.source[:300]}" for p in problems(cell)]
    if bad:
        raise SystemExit(f"{out_path.relative_to(REPO)} not written; its outputs hold:\n" + "\n\n".join(bad))
    nbformat.validate(nb)
    nbformat.write(nb, out_path)
    size = out_path.stat().st_size
    if execute:
        review_copy(nb, rel)
    print(f"{out_path.relative_to(REPO)}: {len(nb.cells)} cells, {size / 1024:.1f} KB, executed in {elapsed:.1f}s"
          + (f" (kernel CPU time {cpu:.1f}s)" if execute else ""))
    if size > MAX_BYTES:
        raise SystemExit(f"{out_path.relative_to(REPO)} is {size / 1e6:.2f} MB: make its figures smaller "
                         f"(figsize, fewer panels); stored notebooks stay under {MAX_BYTES / 1e6:.0f} MB")
    return elapsed


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sources", nargs="+", type=Path, help="notebooks/src/<name>.py (or solutions/<name>.py)")
    ap.add_argument("--no-exec", action="store_true", help="write the cells without running them (no outputs)")
    ap.add_argument("--text-only", action="store_true",
                    help="only markdown cells changed: keep the stored outputs (refused if a code cell changed)")
    args = ap.parse_args()
    for s in args.sources:
        build(s.resolve(), execute=not args.no_exec, text_only=args.text_only)
    sys.exit(0)
