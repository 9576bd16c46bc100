"""Recording the gates during training: a callback that appends one record per logged step.

:class:`GateRecorder` writes ``DIR/gates.jsonl`` (format in :mod:`adapterlab.gates.log`) and draws
``gates.png`` at the end; attach it to :func:`adapterlab.train.train` as a callback. With
``details`` it also records, each an (L, H) array (7 significant digits; a per-layer gate is
repeated over the heads)::

    "raw":          g itself, before the activation (what the optimizer moves)
    "grad":         dL/dg of this step's batch, complete (all micro-batches and ranks), before
                    clipping and the update (null at the first record)
    "prompt_norm":  per head: the RMS over the K prompts of the length of a prompt's value vector
                    (the prompts through the frozen W_v)
    "prompt_share": per head: the mean over the batch's positions (padding left out) of a / (a + b),
                    a = |gated prompt term of Eq. 7|, b = |token term|: the share of the head's output
                    (before W_o) that comes from the prompts; 0 while the gate is closed. Measured in
                    the step's forward pass, with the gates before its update (null at the first record)
    "lr_sum":       the sum of the learning rates of every update so far

Under torchrun the share is rank 0's part of the batch. :func:`ablate_heads` closes one head's
gate at a time and measures what that costs.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..adapter import adapted_layers, gate_values
from ..io.files import atomic_write_text
from .log import GATES_NAME, read_gates
from .plots import PLOT_NAME, save_plot

PAD_ID = 0  # what adapterlab.data.collate pads with (LLaMA's <unk>): left out of the prompt share


def gated_layers(model) -> list[int]:
    """The adapted layers whose adapter has a gate, bottom first (ungated prompts, a study variant,
    have nothing to record: they share the tokens' softmax)."""
    return [i for i in adapted_layers(model) if model.layers[i].attention.adapter.gate is not None]


def gate_record(model, step: int, epoch: float, loss: Optional[float], lr: float) -> dict:
    """One log line: the model's effective gates now, with the step's loss and learning rate.
    ``layers`` names the gated layers only, so it matches the rows of ``gates``; ``n_layers`` is the
    model's depth, so a picture can say how many of its layers are adapted."""
    return {
        "step": int(step),
        "epoch": round(float(epoch), 6),
        "loss": None if loss is None else float(loss),
        "lr": float(lr),
        "layers": gated_layers(model),
        "n_layers": len(model.layers),
        "gates": gate_values(model).tolist(),  # (L gated, H)
    }


def _rounded(rows) -> list:
    """A nested list of floats at 7 significant digits (float32 precision; smaller files)."""
    if isinstance(rows, (list, tuple)):
        return [_rounded(r) for r in rows]
    return float(f"{rows:.7g}")


def _per_head(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """A gate-shaped tensor ((1, H, 1, 1) per head or (1,) per layer) -> (H,)."""
    x = x.detach().float().reshape(-1)
    return x.expand(n_heads) if x.numel() == 1 else x


@torch.no_grad()
def prompt_value_norms(model) -> torch.Tensor:
    """Per gated layer and head: RMS over the K prompts of the length of each prompt's value vector
    in that head (the prompts through the layer's frozen W_v, no image token) -> (L, H)."""
    rows = []
    for i in gated_layers(model):
        attn = model.layers[i].attention
        _, pv = attn.adapter.prompt_kv(attn)  # (1, H_kv, K, d)
        norms = pv[0].float().norm(dim=-1).pow(2).mean(-1).sqrt()  # (H_kv,)
        rows.append(norms.repeat_interleave(attn.n_heads // attn.n_kv_heads))
    return torch.stack(rows) if rows else torch.zeros(0, model.config.n_heads)


def gate_details(model) -> dict:
    """The fields of a record that the model's state alone gives: raw g and the prompt norms."""
    H = model.config.n_heads
    raw = [_per_head(model.layers[i].attention.adapter.gate, H) for i in gated_layers(model)]
    return {"raw": _rounded(torch.stack(raw).tolist()) if raw else [],
            "prompt_norm": _rounded(prompt_value_norms(model).tolist())}


def gate_gradients(model) -> Optional[list]:
    """dL/dg of every gated layer as (L, H) rows, or None when a gate has no gradient."""
    H = model.config.n_heads
    grads = [model.layers[i].attention.adapter.gate.grad for i in gated_layers(model)]
    if not grads or any(g is None for g in grads):
        return None
    return _rounded(torch.stack([_per_head(g, H) for g in grads]).tolist())


class PromptShareMeter:
    """While attached, measures the prompts' share of every gated head's output (``prompt_share``
    in the module docstring) in the forward passes that track gradients (training, not evaluation).

    Forward hooks: on each gated adapter (its output is the gated prompt term), on the attention's
    W_o (its input is the token term plus the prompt term, so the token term is the difference, to
    the precision of the forward pass) and on the token embedding (to leave padding out).
    """

    def __init__(self, model):
        self.layers = gated_layers(model)
        self.sums = torch.zeros(len(self.layers), model.config.n_heads, dtype=torch.float64)
        self.counts = torch.zeros(len(self.layers), 1, dtype=torch.float64)
        self._mask: Optional[torch.Tensor] = None
        self._prompt_terms: dict[int, torch.Tensor] = {}
        self._hooks = []
        embed = getattr(model, "tok_embeddings", None)
        if embed is not None:
            self._hooks.append(embed.register_forward_pre_hook(self._tokens))
        for row, i in enumerate(self.layers):
            attn = model.layers[i].attention
            keep = lambda module, args, out, row=row: self._keep(row, out)  # noqa: E731
            measure = lambda module, args, row=row: self._measure(row, args[0])  # noqa: E731
            self._hooks.append(attn.adapter.register_forward_hook(keep))
            self._hooks.append(attn.wo.register_forward_pre_hook(measure))

    def _tokens(self, module, args) -> None:
        if torch.is_grad_enabled():
            self._mask = (args[0] != PAD_ID).detach()  # (B, T)

    def _keep(self, row: int, prompt_term: torch.Tensor) -> None:
        if torch.is_grad_enabled():  # a training forward pass
            self._prompt_terms[row] = prompt_term.detach()  # (B, H, T, d)

    def _measure(self, row: int, wo_input: torch.Tensor) -> None:
        prompt_term = self._prompt_terms.pop(row, None)
        if prompt_term is not None:
            with torch.no_grad():
                B, H, T, d = prompt_term.shape
                both = wo_input.detach().reshape(B, T, H, d).transpose(1, 2)  # token term + prompt term
                self._add(row, prompt_term, both.float() - prompt_term.float())

    def _add(self, row: int, prompt_term: torch.Tensor, token_term: torch.Tensor) -> None:
        a = prompt_term.detach().float().norm(dim=-1)  # (B, H, T)
        b = token_term.detach().float().norm(dim=-1)
        share = a / (a + b).clamp_min(1e-30)
        B, _, T = share.shape
        mask = self._mask if self._mask is not None and self._mask.shape == (B, T) else None
        if mask is None:
            mask = torch.ones(B, T, dtype=torch.bool, device=share.device)
        w = mask[:, None, :].to(share.dtype)  # (B, 1, T)
        self.sums[row] += (share * w).sum(dim=(0, 2)).double().cpu()
        self.counts[row] += w.sum().double().cpu()

    def result(self) -> Optional[list]:
        """The mean share per (layer, head) over the positions seen, or None if none was seen."""
        if not bool((self.counts > 0).all()):
            return None
        return _rounded((self.sums / self.counts).tolist())

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


@torch.no_grad()
def ablate_heads(model, metric) -> tuple[float, np.ndarray]:
    """Close one head's gate at a time (g = 0, so its prompts add nothing) and measure.

    metric(model) -> float, e.g. the held-out loss. Returns (metric with every gate as trained,
    (L, H) metric with the gate of that gated layer and head set to 0). The gates are restored
    afterwards. Needs per-head gates (``AdapterConfig(gate="head")``).
    """
    layers = gated_layers(model)
    if not layers:
        require_gates(model, "ablate_heads")
    gate_params = [model.layers[i].attention.adapter.gate for i in layers]
    if any(g.numel() == 1 for g in gate_params):
        raise ValueError("ablate_heads: this adapter has one gate per layer (AdapterConfig(gate='layer')); "
                         "closing one head needs gate='head'")
    base = float(metric(model))
    result = np.zeros((len(layers), gate_params[0].numel()))
    for row, g in enumerate(gate_params):
        for h in range(g.numel()):
            kept = g.view(-1)[h].item()
            g.view(-1)[h] = 0.0
            try:
                result[row, h] = float(metric(model))
            finally:
                g.view(-1)[h] = kept
    return base, result


def require_gates(model, who: str) -> None:
    """A clear error instead of a log of empty rows when the model has no gate to record."""
    if not gated_layers(model):
        layers = adapted_layers(model)
        what = f"its prompts (layers {layers}) are ungated" if layers else "it carries no adapter"
        raise ValueError(f"{who}: the model has no gate to record - {what}. Attach the callback only to a "
                         "model with a gated adapter (add_adapter).")


def start_record(state: dict) -> dict:
    """The gate record of the step a run starts from (0, or a resumed run's checkpoint step), with
    the epoch and learning rate the run has there (``state``: what train() passes to on_start;
    another caller that gives no epoch or lr gets 0.0)."""
    return gate_record(state["model"], state["start_step"], state.get("epoch", 0.0), None, state.get("lr", 0.0))


class GateRecorder:
    """Append a gate record to ``DIR/gates.jsonl`` every ``every`` steps; draw ``gates.png`` at the end.

    A training callback (on_start / on_gradients / on_step / on_end, see
    :class:`adapterlab.train.Callback`): ``train(model, data, config, callbacks=[GateRecorder(out_dir)])``.
    ``details`` (default): also raw g, its gradient, the prompt
    norms, the prompts' share of each head's output and the summed learning rate (module
    docstring). They are measured only on the steps that are logged: the share by forward hooks
    attached for that step's forward pass, the gradient just before that step's update.

    On a resumed run, lines written after the checkpoint's step are dropped first, so the log of
    a run killed and resumed is identical to an uninterrupted one.
    """

    def __init__(self, out_dir: str | os.PathLike, every: int = 10, plot: bool = True, details: bool = True):
        self.dir = Path(out_dir)
        self.path = self.dir / GATES_NAME
        self.every = every
        self.plot = plot
        self.details = details
        self.total_steps: Optional[int] = None
        self.lr_sum: Optional[float] = 0.0
        self._grad: Optional[list] = None
        self._meter: Optional[PromptShareMeter] = None

    def _due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total_steps

    def on_start(self, state: dict) -> None:
        require_gates(state["model"], "GateRecorder")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.total_steps = state["total_steps"]
        self.lr_sum = state.get("lr_sum", 0.0 if state["start_step"] == 0 else None)  # (train() gives it)
        if state["resumed"]:
            kept = [r for r in read_gates(self.path, missing_ok=True) if r["step"] <= state["start_step"]]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        else:
            atomic_write_text(self.path, json.dumps(self._record(start_record(state), state["model"])) + "\n")
        self._arm(state["model"], state["start_step"] + 1)

    def _arm(self, model, next_step: int) -> None:
        """Attach the share meter for the forward pass of ``next_step`` if that step is logged."""
        if self.details and self._meter is None and next_step <= self.total_steps and self._due(next_step):
            self._meter = PromptShareMeter(model)

    def _record(self, record: dict, model) -> dict:
        if not self.details:
            return record
        share = None
        if self._meter is not None:
            share = self._meter.result()
            self._meter.remove()
            self._meter = None
        details = gate_details(model)
        record.update({"raw": details["raw"], "grad": self._grad, "prompt_norm": details["prompt_norm"],
                       "prompt_share": share, "lr_sum": None if self.lr_sum is None else float(f"{self.lr_sum:.9g}")})
        self._grad = None
        return record

    def on_gradients(self, step: int, model) -> None:
        if self.details and self._due(step):
            self._grad = gate_gradients(model)

    def on_step(self, step: int, info: dict) -> None:
        if self.lr_sum is not None:
            self.lr_sum += info["lr"]
        if self._due(step) or step == info["total_steps"]:
            record = gate_record(info["model"], step, info["epoch"], info["loss"], info["lr"])
            line = json.dumps(self._record(record, info["model"]))
            with open(self.path, "a") as f:
                f.write(line + "\n")
                f.flush()
        self._arm(info["model"], step + 1)

    def on_end(self, info: dict) -> None:
        if self._meter is not None:
            self._meter.remove()
            self._meter = None
        if self.plot:
            save_plot(self.path, self.dir / PLOT_NAME)
