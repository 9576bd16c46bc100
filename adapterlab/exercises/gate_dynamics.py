"""Checkers for notebook 06 (gate dynamics): which layers carry an adapter, and which layer's gates
opened most in a recorded run (read with ``gates.GateLog``).
"""
from __future__ import annotations

from typing import Optional

from ..gates import GateLog
from .feedback import CheckResult, _ok, _no, _missing, _is_blank, _as_int


def _as_int_set(answer, what: str) -> tuple[Optional[set], Optional[CheckResult]]:
    if isinstance(answer, (int, str)) or not hasattr(answer, "__iter__"):
        answer = [answer]
    try:
        values = {int(a) for a in answer}
    except (TypeError, ValueError):
        return None, _no(f"{what} should be a set of integers such as {{0, 1}}; got {answer!r}.")
    return values, None


def check_adapted_layers(answer, n_layers: int = 4, layers: int = 2) -> CheckResult:
    """Exercise: which layer indices (0-based) carry an adapter with AdapterConfig(layers=L) on an N-layer model?"""
    if _is_blank(answer):
        return _missing("a set of layer indices, e.g. {0, 1}")
    got, err = _as_int_set(answer, "the answer")
    if err is not None:
        return err
    expected = set(range(n_layers - layers, n_layers))
    if got == expected:
        return _ok(f"the top L={layers} of N={n_layers} layers: {sorted(expected)}. The paper adapts the top layers, "
                   "where the representations are most abstract (30 of LLaMA-7B's 32).")
    if got == set(range(layers)):
        return _no(f"{sorted(got)} are the bottom {layers} layers; LLaMA-Adapter inserts prompts in the TOP L layers.")
    if got == set(range(n_layers - layers + 1, n_layers + 1)):
        return _no(f"{sorted(got)} counts from 1; layer indices start at 0 (the last layer is {n_layers - 1}).")
    if len(got) != layers:
        return _no(f"you gave {len(got)} layer(s); AdapterConfig(layers={layers}) adapts exactly {layers}.")
    return _no(f"{sorted(got)} is not it: the adapter goes in the top L={layers} layers of the N={n_layers}.")


def check_most_open_layer(answer, log) -> CheckResult:
    """Exercise: in a gate log (a run folder, gates.jsonl, records or GateLog), which adapted layer
    has the largest mean |gate| over its heads at the last record? Answer with the layer index."""
    if _is_blank(answer):
        return _missing("a layer index (an integer)")
    n, err = _as_int(answer, "the layer index")
    if err is not None:
        return err
    g = log if isinstance(log, GateLog) else GateLog.from_records(log) if isinstance(log, (list, tuple)) else GateLog.read(log)
    last = g.gates[-1]  # (L, H)
    mean_abs = abs(last).mean(-1)
    expected = g.layers[int(mean_abs.argmax())]
    if n == expected:
        return _ok(f"layer {expected}: mean |gate| {mean_abs.max():.3f} at step {int(g.steps[-1])}. Per layer: "
                   + ", ".join(f"{layer}: {v:.3f}" for layer, v in zip(g.layers, mean_abs)) + ".")
    if n not in g.layers:
        return _no(f"layer {n} has no adapter; the adapted layers are {g.layers}.")
    if n == g.layers[int(abs(last).max(-1).argmax())]:
        return _no(f"layer {n} has the single most open head, but the question asks for the largest MEAN |gate| "
                   "over the heads of a layer.")
    if n == g.layers[int(last.mean(-1).argmax())]:
        return _no(f"layer {n} has the largest signed mean. Gates can be negative (the prompts then subtract); "
                   "compare the mean of |gate|.")
    if n == g.layers[int(abs(g.gates[0]).mean(-1).argmax())] and n != expected:
        return _no("that is the first record (step 0), where all gates are 0; look at the last record.")
    return _no(f"layer {n} is not the one. Take the last record, average |gate| over the heads of each layer, "
               "and pick the largest.")
