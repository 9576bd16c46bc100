"""The gate-dynamics study that notebook 6 reads: too long to run inside the notebook.

Runs on the embedded tiny world, each with the tiny-world defaults of adapterlab.recipes.TINY_WORLD
(K=10 prompts in all 4 layers, batch 32, 10 warm-up steps, 300 steps, cosine schedule) unless
the group changes a setting:

    optimizer   AdamW (lr 5e-2 and weight decay 0.02, the defaults: decoupled, it shrinks a gate by
                0.1% per step) vs plain SGD (lr 10, no weight decay: SGD's L2 decay of 0.02 at lr 10
                would shrink every gate by 20% per step), seeds 0..4; the gate log with
                every detail every 5 steps; per-head ablation of the held-out loss at the end
    sweep       one setting changed at a time from the AdamW run: lr 1e-2 / 1.5e-1, L = 1 / 2
                adapted layers, K = 1 / 40 prompts; seeds 0..2 (the AdamW runs of seeds 0..2 are
                the sweep's centre); gates and prompt share every 10 steps

Each run appends one JSON line to runs.jsonl (settings, held-out accuracy and loss, training loss,
per-head ablation, the gate log); a run already in the file is skipped, so an interrupted study
resumes. summary.json records the command, date, machine and versions.

    OMP_NUM_THREADS=1 ADAPTERLAB_THREADS=1 python docs/results/gate_lab/study.py
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from adapterlab import AdapterConfig, add_adapter, load_llama, tinyworld
from adapterlab.ablate import mean_loss
from adapterlab.data import instruction_dataset
from adapterlab.gates import GateRecorder, ablate_heads
from adapterlab.files import atomic_write_text
from adapterlab.recipes import TINY_WORLD
from adapterlab.train import TrainConfig, train

HERE = Path(__file__).resolve().parent
SGD_LR = 10.0  # plain SGD needs a far larger step than AdamW: the gradients of the gates are ~1e-3..1e-2


def runs_wanted(seeds_opt: int, seeds_sweep: int) -> list[dict]:
    t = TINY_WORLD
    base = dict(optimizer="adamw", lr=t.lr["adapter"], layers=t.adapter.layers, prompt_len=t.adapter.prompt_len,
                steps=t.train.steps)
    runs = []
    for seed in range(seeds_opt):
        runs.append({"study": "optimizer", "name": "AdamW", "seed": seed, **base, "every": 5, "details": True})
        runs.append({"study": "optimizer", "name": "SGD", "seed": seed, **base, "optimizer": "sgd", "lr": SGD_LR,
                     "weight_decay": 0.0, "every": 5, "details": True})
    changes = [("lr 0.01", {"lr": 1e-2}), ("lr 0.15", {"lr": 1.5e-1}), ("L = 1", {"layers": 1}),
               ("L = 2", {"layers": 2}), ("K = 1", {"prompt_len": 1}), ("K = 40", {"prompt_len": 40})]
    for seed in range(seeds_sweep):
        for name, change in changes:
            runs.append({"study": "sweep", "name": name, "seed": seed, **base, **change, "every": 10, "details": False})
    return runs


def key(run: dict) -> tuple:
    return (run["study"], run["name"], run["seed"])


def _short(x):
    """4 significant digits: the committed logs stay small."""
    if isinstance(x, list):
        return [_short(v) for v in x]
    return x if x is None or isinstance(x, (int, str)) else float(f"{x:.4g}")


def one_run(spec: dict, data, heldout_data, heldout_records) -> dict:
    model = load_llama("tinyworld")
    tokenizer = model.tokenizer
    add_adapter(model, AdapterConfig(prompt_len=spec["prompt_len"], layers=spec["layers"]), seed=spec["seed"])
    t = TINY_WORLD
    config = TrainConfig(steps=spec["steps"], batch_size=t.train.batch_size, lr=spec["lr"],
                         warmup_steps=t.train.warmup_steps,
                         length_group=t.train.length_group, optimizer=spec["optimizer"], seed=spec["seed"],
                         weight_decay=spec.get("weight_decay", TrainConfig.weight_decay),
                         checkpoint=False, progress=False, log_every=spec["every"])
    start = time.time()
    out = Path(tempfile.mkdtemp(prefix="gate-lab-"))
    recorder = GateRecorder(out, every=spec["every"], plot=False, details=True)
    metrics = train(model, data, config, callbacks=[recorder])
    records = [json.loads(line) for line in (out / "gates.jsonl").read_text().splitlines()]
    shutil.rmtree(out)
    keep = ("step", "loss", "lr", "lr_sum", "layers", "gates", "prompt_share") + (
        ("raw", "grad", "prompt_norm") if spec["details"] else ())
    log = [{k: _short(r[k]) if k not in ("step", "layers") else r[k] for k in keep} for r in records]
    model.eval()
    result = {**spec, "heldout_accuracy": tinyworld.heldout_accuracy(model, tokenizer, heldout_records),
              "train_loss_last10": float(np.mean([l for _, l in metrics["loss_history"]][-10:]))}
    if spec["study"] == "optimizer":
        base, ablated = ablate_heads(model, lambda m: mean_loss(m, heldout_data))
        result["heldout_loss"] = base
        result["ablated_heldout_loss"] = _short(ablated.tolist())
    else:
        result["heldout_loss"] = mean_loss(model, heldout_data)
    result["run_seconds"] = round(time.time() - start, 1)
    result["log"] = log
    return result


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(l.split(":", 1)[1].strip() for l in lscpu.splitlines() if l.startswith("Model name"))
    except Exception:
        name = platform.processor() or platform.machine()
    return f"{name}, {torch.get_num_threads()} torch thread(s), {platform.system()}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(HERE))
    parser.add_argument("--seeds-optimizer", type=int, default=5)
    parser.add_argument("--seeds-sweep", type=int, default=3)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / "runs.jsonl"
    done = {key(json.loads(l)) for l in runs_path.read_text().splitlines()} if runs_path.is_file() else set()
    world, train_records, heldout_records = tinyworld.load_world()
    tokenizer = load_llama("tinyworld").tokenizer
    data = instruction_dataset(train_records, tokenizer, max_seq_len=TINY_WORLD.max_seq_len)
    heldout_data = instruction_dataset(heldout_records, tokenizer, max_seq_len=TINY_WORLD.max_seq_len)
    for spec in runs_wanted(args.seeds_optimizer, args.seeds_sweep):
        if key(spec) in done:
            continue
        result = one_run(spec, data, heldout_data, heldout_records)
        with open(runs_path, "a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"{spec['study']:9s} {spec['name']:8s} seed {spec['seed']}: held-out acc {result['heldout_accuracy']:.2f} "
              f"loss {result['heldout_loss']:.3f} ({result['run_seconds']:.0f} s)", flush=True)
    import adapterlab

    summary = {"command": "OMP_NUM_THREADS=1 ADAPTERLAB_THREADS=1 python docs/results/gate_lab/study.py "
                          + " ".join(sys.argv[1:] if argv is None else argv),
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
               "versions": {"adapterlab": getattr(adapterlab, "__version__", "?"), "torch": torch.__version__,
                            "numpy": np.__version__, "python": platform.python_version()},
               "sgd_lr": SGD_LR, "defaults": {"steps": TINY_WORLD.train.steps,
                                                "batch_size": TINY_WORLD.train.batch_size,
                                                "warmup_steps": TINY_WORLD.train.warmup_steps}}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
