"""The one harness every study runs on (ablate, families): its runs file, resuming, the machine, the statistics.

A study is a list of runs; each finished run is one JSON record, one line of ``DIR/runs.jsonl``.
:func:`run_missing` runs the ones not there yet behind a progress bar and rewrites the file
atomically after each, so a study killed at any moment loses at most the run it was in and the
next call redoes only that. A folder whose runs were made with other settings is refused
(:func:`check_settings`). The numbers are over seeds: mean, sample std and a 95% interval
(Student's t); two methods are compared seed by seed (same seed: same data order and draws), and
one "beats" the other only where the 95% interval of the paired difference excludes zero.

Every method has one name (:data:`METHOD_NAMES`) and every metric one name; runs written under an
older name are read under the new one (:data:`OLD_NAMES`, :data:`OLD_FIELDS`), so committed studies
keep loading.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

from ..io.files import atomic_write_text, build_machine

RUNS_NAME = "runs.jsonl"

# --------------------------------------------------------------------------- one name per method
METHOD_NAMES = ("zero_init", "random_init", "ungated", "lora", "full", "bitfit", "linear", "input_prompts")
OLD_NAMES = {"zero": "zero_init", "adapter": "zero_init", "random": "random_init", "none": "ungated",
             "ungated_prompts": "ungated"}  # older spellings (runs, summaries, the CLI) -> the one name
# Older metric names -> today's. An ablation's "prompt_share" was |g| / (1 + |g|) (ungated: the softmax
# mass on the prompts), not adapterlab.gates' "prompt_share" (a share of the head's output): now "attention_share".
OLD_FIELDS = {"knowledge_kept": "pretrain_loss_after", "prompt_share": "attention_share"}
NESTED = ("gate_log",)  # lists of records inside a run whose fields are renamed the same way


def method_name(name: str) -> str:
    """The one name of a method, given it or an older spelling ("zero" -> "zero_init")."""
    return OLD_NAMES.get(name, name)


def upgrade(record: dict) -> dict:
    """A run or summary row written by older code, with today's method and metric names (also in
    the records of its :data:`NESTED` lists)."""
    out = {OLD_FIELDS.get(k, k): v for k, v in record.items()}
    for key in ("variant", "method"):
        if isinstance(out.get(key), str):
            out[key] = method_name(out[key])
    for key in NESTED:
        if isinstance(out.get(key), list):
            out[key] = [{OLD_FIELDS.get(k, k): v for k, v in r.items()} if isinstance(r, dict) else r
                        for r in out[key]]
    return out


def upgrade_keys(table: dict) -> dict:
    """{method: row} with today's method names (and metric names in each row)."""
    return {method_name(k): upgrade(v) if isinstance(v, dict) else v for k, v in table.items()}


# --------------------------------------------------------------------------- the runs file
def read_runs(path: str | os.PathLike) -> list[dict]:
    """The finished runs of a runs.jsonl, with today's names ([] if there is no file). A line that
    does not parse is an error naming it."""
    path = Path(path)
    if not path.is_file():
        return []
    runs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            runs.append(upgrade(json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {n}: not JSON ({e}); delete that line to redo the run") from None
    return runs


def study_folder(out_dir: str | os.PathLike) -> Path:
    """The study's folder, made if missing; a file there is an error."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the study's results")
    out.mkdir(parents=True, exist_ok=True)
    return out


def check_settings(runs: Sequence[dict], settings: dict, path: Path) -> None:
    """Refuse to resume into a folder whose runs were made with other settings (naming those that differ)."""
    for r in runs:
        if r.get("settings") != settings:
            changed = sorted(k for k in settings if (r.get("settings") or {}).get(k) != settings[k])
            raise ValueError(f"{path} holds runs made with other settings (differing: {', '.join(changed) or 'all'}); "
                             "use a new --out folder, or the same settings to resume")


def write_runs(path: Path, runs: Sequence[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in runs))


def study_bar(total: int, done: int = 0, desc: str = "runs", progress: bool = True):
    """The study's progress bar: ``total`` runs, ``done`` of them finished before (None if not ``progress``)."""
    if not progress:
        return None
    from ..io.files import progress_bar

    return progress_bar(total=total, initial=done, desc=desc, unit="run")


def run_missing(todo: Iterable, run: Callable[[object], dict], runs: list[dict], path: Path, bar=None,
                label: Callable[[object], str] = str) -> list[dict]:
    """Run every item of ``todo`` with ``run(item)``, appending each record to ``runs`` and
    rewriting ``path`` atomically after each; ``bar`` (:func:`study_bar`) shows ``label(item)``
    and counts the runs. Returns ``runs``."""
    for item in todo:
        if bar is not None:
            bar.set_postfix_str(label(item))
        runs.append(run(item))
        write_runs(path, runs)
        if bar is not None:
            bar.update(1)
    return runs


# --------------------------------------------------------------------------- where the numbers were made
def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(threads: Optional[int] = None) -> dict:
    """The CPU, its vector unit (AVX2, AVX512: float sums and so the numbers depend on it), the
    threads (None or 0: those torch uses now), the platform and the versions of python, torch and numpy."""
    import importlib.metadata

    import numpy

    built = build_machine()  # the same vector-unit probe the cached bases record
    return {"cpu": cpu_name(), "vector_unit": built["cpu"], "threads": threads or torch.get_num_threads(),
            "platform": platform.platform(), "torch": torch.__version__, "python": sys.version.split()[0],
            "numpy": numpy.__version__, "adapterlab": importlib.metadata.version("adapterlab")}


# --------------------------------------------------------------------------- statistics over seeds
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def stats(values: Iterable[float]) -> dict:
    """mean, sample std and a 95% interval for the mean (Student's t) over seeds."""
    xs = [float(x) for x in values]
    n = len(xs)
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    half = (T_975[n - 2] if n - 1 <= len(T_975) else 1.96) * std / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half] if n > 1 else None, "n": n}


def paired(a: dict, b: dict, lower_is_better: bool) -> dict:
    """a against b, paired by seed ({seed: value} each): the stats of a - b over the seeds both
    have, and a verdict: "better" or "worse" for a when the difference's 95% interval excludes
    zero, "no clear difference" otherwise. Needs at least 2 common seeds."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        raise ValueError(f"a paired comparison needs at least 2 seeds run for both; found {len(seeds)}")
    diff = stats([a[s] - b[s] for s in seeds])
    lo, hi = diff["ci95"]
    if lo <= 0 <= hi:
        verdict = "no clear difference"
    else:
        verdict = "better" if (diff["mean"] < 0) == lower_is_better else "worse"
    return {"difference": diff, "verdict": verdict}


VERBS = {"better": "beats", "worse": "loses to", "no clear difference": "is not clearly different from"}
MIN_SEEDS = 5  # below this a study's table can show a "win" that more seeds refute (docs/results/ablations)


# --------------------------------------------------------------------------- tables
def mean_pm_std(mean: float, std: float, digits: int, pm: str = "+-", scale: float = 1.0) -> str:
    """"0.40 +- 0.02" (scale=100: in percent)."""
    return f"{scale * mean:.{digits}f} {pm} {scale * std:.{digits}f}"


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], widths: Sequence[int]) -> str:
    """Text columns: the first left-aligned, the others right-aligned, each ``widths[i]`` wide."""
    def line(cells: Sequence[str]) -> str:
        first, *rest = cells
        return " ".join([f"{first:{widths[0]}s}", *(f"{c:>{w}s}" for c, w in zip(rest, widths[1:]))])

    return "\n".join(line(r) for r in [header, *rows])


__all__ = ["RUNS_NAME", "METHOD_NAMES", "OLD_NAMES", "OLD_FIELDS", "NESTED", "method_name", "upgrade", "upgrade_keys",
           "read_runs", "study_folder", "check_settings", "write_runs", "study_bar", "run_missing", "cpu_name", "machine", "stats",
           "paired", "VERBS", "MIN_SEEDS", "mean_pm_std", "format_table"]
