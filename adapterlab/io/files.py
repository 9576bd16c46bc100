"""Files and the machine: atomic writes, the cache folder, a cross-process lock, CPU threads, progress.

Everything that writes a file other processes may read at the same moment (a checkpoint, gates.jsonl,
metrics.json, a cached base) goes through here, so a reader - or a process killed at any moment - sees
the old file or the new one, never half of one. Nothing from the rest of adapterlab: the core writes through it.

Portable on purpose: no POSIX-only module (fcntl) - students run this on Windows too.
"""
from __future__ import annotations

import contextlib
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Optional

import torch
from filelock import FileLock

TEMP_SUFFIX = ".tmp"
STALE_AFTER_S = 60.0  # a temp file this old belongs to a writer that died (a live one exists for milliseconds)


# --------------------------------------------------------------------------- atomic writes
def temp_path(path: Path) -> Path:
    """The temporary sibling every atomic writer uses: ``.<name>.<pid>.tmp``."""
    return path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():  # write() raised: leave no temp file behind
            tmp.unlink()
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


def remove_stale_temps(folder: str | os.PathLike, older_than_s: float = STALE_AFTER_S) -> list[Path]:
    """Delete temp files left in ``folder`` by writers killed mid-write (not those of live writers)."""
    now = time.time()
    removed = []
    for tmp in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            if now - tmp.stat().st_mtime > older_than_s:
                tmp.unlink()
                removed.append(tmp)
    return removed


def publish_folder(final: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Fill a temporary sibling folder with ``write(folder)``, then rename it to ``final``
    (replacing an old one): readers see no folder or a complete one. Hold ``file_lock`` around it
    when other processes may publish the same folder."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# --------------------------------------------------------------------------- shipped bases, the cache and its lock
SHIPPED_ROOT = Path(__file__).resolve().parents[1] / "bases"  # adapterlab/bases/


def cache_root() -> Path:
    """Where built bases are kept: ``$ADAPTERLAB_CACHE``, else ``~/.cache/adapterlab``."""
    return Path(os.environ.get("ADAPTERLAB_CACHE") or Path.home() / ".cache" / "adapterlab")


def shipped_base(name: str) -> Optional[Path]:
    """The folder ``adapterlab/bases/<name>`` if the package ships that base (built by our own
    pretraining code, stored as safetensors), else None. ``name`` carries the recipe's hash, so a
    changed recipe finds no shipped folder and falls back to the cache (and a build)."""
    folder = SHIPPED_ROOT / name
    return folder if folder.is_dir() else None


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock across processes (filelock: works on Linux, macOS and Windows); others
    wait here until the holder leaves or dies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path)):
        yield


# --------------------------------------------------------------------------- CPU threads
# Every base we cache or ship is pretrained with this many threads, whatever $ADAPTERLAB_THREADS
# says: float sums split over several threads round differently, so a base built with 2 threads
# is another base. With one, a fresh build gives the same bytes on any machine of the same CPU kind.
BUILD_THREADS = 1


def default_threads() -> int:
    """CPU threads for the embedded models' work: ``$ADAPTERLAB_THREADS``, else 1.

    Their matrices are small (a few hundred wide): a second thread gains little on an idle
    machine, and on a busy one (other processes, a classroom server with many kernels, a notebook
    beside a test run) torch's thread pool made a training step 3-8 times *slower* than one thread
    in our measurements. 0 means torch's own choice.
    """
    value = os.environ.get("ADAPTERLAB_THREADS", "1")
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"ADAPTERLAB_THREADS must be a whole number (0 = torch's choice); got {value!r}") from None
    if n < 0:
        raise ValueError(f"ADAPTERLAB_THREADS must be >= 0 (0 = torch's choice); got {n}")
    return n


@contextlib.contextmanager
def cpu_threads(n: Optional[int]) -> Iterator[None]:
    """Run the block with torch using ``n`` CPU threads (None or 0: leave torch's setting)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- pretrained bases: shipped, cached or built
def build_machine() -> dict:
    """What decides a base's bytes besides its recipe: threads, torch and the CPU's vector unit."""
    return {"threads": BUILD_THREADS, "torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine()}


def base_folder(name: str, marker: str, build: Callable[[Path], Any], force: bool = False,
                announce: Optional[str] = None) -> Path:
    """The folder of the pretrained base ``name``: shipped with the package, else in the cache,
    else built now into the cache. Every base of the package (tiny world, scenes, ViT, text
    encoder) is found this way.

    ``build(folder)`` pretrains and writes the base into an empty folder; it runs with
    ``BUILD_THREADS`` threads, under a lock (concurrent first uses wait for one build), and the
    folder is published whole or not at all. ``marker``: the file whose presence says a cached
    folder is complete. force=True: build anew into the cache (a shipped copy is left alone and
    still found first: compare the two to check a rebuild). announce: printed before a build.
    """
    shipped = shipped_base(name)
    if shipped is not None and not force:
        return shipped
    final = cache_root() / name
    if (final / marker).is_file() and not force:
        return final
    with file_lock(final.with_name(final.name + ".lock")):
        if (final / marker).is_file() and not force:  # another process built it while we waited
            return final
        if announce:
            print(announce.format(folder=final))
        with cpu_threads(BUILD_THREADS):
            publish_folder(final, build)
    return final


# --------------------------------------------------------------------------- progress of a long job
PLAIN_PROGRESS_LINES = 10  # a job whose stderr is a file prints a line at every tenth of its work


def interactive_stderr() -> bool:
    """stderr is a terminal or a notebook's output, where a bar redraws in place; not a file or a pipe."""
    return sys.stderr.isatty() or type(sys.stderr).__module__.startswith("ipykernel")


def progress_bar(iterable=None, *, total: Optional[int] = None, desc: str = "", unit: str = "it", initial: int = 0,
                 disable: bool = False, leave: bool = True):
    """The progress display of every long job: tqdm's bar in a terminal or a notebook; elsewhere
    (stderr redirected to a log file, a CI job) a few plain lines (:class:`PlainProgress`), not a
    redraw per step. Use it as tqdm: iterate over it, or call ``update``, ``set_postfix``, ``close``."""
    if disable or interactive_stderr():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable, leave=leave,
                    dynamic_ncols=True)
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, initial=initial)


class PlainProgress:
    """tqdm's calls, printed as one line per tenth of the work: ``desc: 30/300 steps (10%) in 12 s, loss=0.5``."""

    def __init__(self, iterable=None, *, total: Optional[int] = None, desc: str = "", unit: str = "it",
                 initial: int = 0, lines: int = PLAIN_PROGRESS_LINES, file=None):
        self.iterable = iterable
        self.total = len(iterable) if total is None and hasattr(iterable, "__len__") else total
        self.n, self.desc, self.unit, self.lines = initial, desc, unit, lines
        self.postfix = ""
        self.file = file
        self.start = time.perf_counter()
        self.shown = self._part(initial)  # a resumed job counts its tenths from where it was

    def _part(self, n: int) -> int:
        return n * self.lines // self.total if self.total else 0

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._part(self.n) > self.shown:
            self.shown = self._part(self.n)
            self._print()

    def _print(self) -> None:
        units = self.unit if self.unit.endswith("s") else self.unit + "s"
        share = f"/{self.total} {units} ({100 * self.n // self.total}%)" if self.total else f" {units}"
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc + ': ' if self.desc else ''}{self.n}{share} in {time.perf_counter() - self.start:.0f} s"
              f"{extra}", file=self.file or sys.stderr, flush=True)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in {**(ordered_dict or {}), **values}.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def close(self) -> None:
        if not self.total and self.n:  # no tenths to count: one line at the end
            self._print()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
