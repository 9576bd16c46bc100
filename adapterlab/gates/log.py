"""Reading a gate log back: ``DIR/gates.jsonl`` -> records -> :class:`GateLog` arrays -> a summary.

One JSON line per logged step (written by :class:`adapterlab.gates.GateRecorder`)::

    {"step": 120, "epoch": 1.5, "loss": 0.83, "lr": 0.0061, "layers": [2, 3], "n_layers": 4,
     "gates": [[...H...], [...H...]]}

``gates`` holds the effective gate (tanh(g), or g for an identity gate), one row per gated layer
(bottom first), one value per head; the optional details (:data:`DETAILS`) are (L, H) arrays too.
``n_layers`` (the model's depth; absent in older logs) lets a picture say "2 of 4 layers adapted".
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

GATES_NAME = "gates.jsonl"
DETAILS = ("raw", "grad", "prompt_norm", "prompt_share")  # the (L, H) fields besides "gates"
QUANTITIES = ("gates",) + DETAILS


def read_gates(path: str | os.PathLike, missing_ok: bool = False) -> list[dict]:
    """The records of a gates.jsonl file (or of DIR/gates.jsonl). A torn last line (a run killed
    while writing) is skipped; any other bad line is an error naming the file and line."""
    path = Path(path)
    if path.is_dir():
        path = path / GATES_NAME
    if not path.is_file():
        if missing_ok:
            return []
        raise FileNotFoundError(f"{path}: no gate log here; pass a run folder with gates.jsonl or the file itself")
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # torn write at the end
            raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
        for key in ("step", "layers", "gates"):
            if key not in rec:
                raise ValueError(f"{path}: line {i + 1} has no {key!r}; is this a gates.jsonl written by adapterlab?")
        records.append(rec)
    return records


@dataclass
class GateLog:
    """A gate log as arrays: steps (S,), gates (S, L, H), loss (S,) with NaN where absent, lr (S,).

    When the records have them (module docstring): raw, grad, prompt_norm, prompt_share as
    (S, L, H) arrays (NaN in a record that lacks a value, e.g. the gradient at step 0) and lr_sum
    (S,); otherwise these are None (a log written without details, or by an older version).
    n_layers: the model's depth (None in a log written before it was recorded).
    """

    steps: np.ndarray
    gates: np.ndarray
    loss: np.ndarray
    lr: np.ndarray
    layers: list[int]
    raw: Optional[np.ndarray] = None
    grad: Optional[np.ndarray] = None
    prompt_norm: Optional[np.ndarray] = None
    prompt_share: Optional[np.ndarray] = None
    lr_sum: Optional[np.ndarray] = None
    n_layers: Optional[int] = None

    @classmethod
    def from_records(cls, records: Sequence[dict]) -> "GateLog":
        if not records:
            raise ValueError("the gate log is empty")
        gates = np.array([r["gates"] for r in records], dtype=np.float64)
        details = {name: _field(records, name, gates.shape[1:]) for name in DETAILS}
        lr_sum = None
        if any(r.get("lr_sum") is not None for r in records):
            lr_sum = np.array([np.nan if r.get("lr_sum") is None else r["lr_sum"] for r in records], dtype=np.float64)
        return cls(
            steps=np.array([r["step"] for r in records]),
            gates=gates,
            loss=np.array([np.nan if r.get("loss") is None else r["loss"] for r in records], dtype=np.float64),
            lr=np.array([r.get("lr", np.nan) for r in records], dtype=np.float64),
            layers=list(records[-1]["layers"]),
            lr_sum=lr_sum,
            n_layers=records[-1].get("n_layers"),
            **details,
        )

    @classmethod
    def read(cls, path: str | os.PathLike) -> "GateLog":
        return cls.from_records(read_gates(path))

    def quantity(self, name: str) -> np.ndarray:
        """One of :data:`QUANTITIES` as (S, L, H); an error naming what the log has if it is absent."""
        if name not in QUANTITIES:
            raise ValueError(f"unknown gate-log quantity {name!r}; choose one of {QUANTITIES}")
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"this gate log has no {name!r} (recorded without details, or by an older version); "
                             f"it has {self.available()}")
        return value

    def available(self) -> list[str]:
        """The quantities this log has, "gates" first."""
        return [q for q in QUANTITIES if getattr(self, q) is not None]

    def cumulative_lr(self) -> np.ndarray:
        """The sum of the learning rates of every update up to each record (S,): ``lr_sum`` when
        recorded; otherwise from the logged rates, each standing for the steps since the record
        before it (exact when every step is logged)."""
        if self.lr_sum is not None and np.isfinite(self.lr_sum).all():
            return self.lr_sum
        gaps = np.diff(self.steps, prepend=self.steps[0]).astype(np.float64)
        return np.cumsum(np.nan_to_num(self.lr) * gaps)


def _field(records: Sequence[dict], name: str, shape: tuple) -> Optional[np.ndarray]:
    """The (S, L, H) array of one detail field, NaN where a record has none; None if no record has it."""
    if not any(r.get(name) is not None for r in records):
        return None
    nan = np.full(shape, np.nan)
    return np.array([nan if r.get(name) is None else np.asarray(r[name], dtype=np.float64).reshape(shape)
                     for r in records], dtype=np.float64)


def _as_log(source) -> GateLog:
    if isinstance(source, GateLog):
        return source
    if isinstance(source, (list, tuple)):
        return GateLog.from_records(source)
    return GateLog.read(source)


def summarize(source) -> dict:
    """Numbers that describe a gate log: per-layer mean |gate| at the start and the end, largest head."""
    log = _as_log(source)
    first, last = log.gates[0], log.gates[-1]  # (L, H)
    per_layer = []
    for i, layer in enumerate(log.layers):
        head = int(np.abs(last[i]).argmax())
        per_layer.append({"layer": layer, "start_mean_abs": float(np.abs(first[i]).mean()),
                          "end_mean_abs": float(np.abs(last[i]).mean()), "end_max_head": head,
                          "end_max_value": float(last[i, head])})
    finite = log.loss[np.isfinite(log.loss)]
    return {"records": len(log.steps), "first_step": int(log.steps[0]), "last_step": int(log.steps[-1]),
            "layers": per_layer, "first_loss": float(finite[0]) if finite.size else None,
            "last_loss": float(finite[-1]) if finite.size else None}


def format_summary(summary: dict) -> str:
    lines = [f"{summary['records']} records, steps {summary['first_step']}..{summary['last_step']}"]
    if summary["first_loss"] is not None:
        lines[0] += f", loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}"
    lines.append("layer   mean|gate| start -> end   largest head (value)")
    for row in summary["layers"]:
        lines.append(f"{row['layer']:>5}   {row['start_mean_abs']:10.4f} -> {row['end_mean_abs']:.4f}"
                     f"   head {row['end_max_head']} ({row['end_max_value']:+.4f})")
    return "\n".join(lines)
