# %% [markdown]
# # 6. Gate dynamics
#
# **Goal.** The gates are the adapter's volume knobs: one per head in each adapted layer,
# starting at 0 (Eq. 7). In this notebook we record them during training and look at them
# from every side: a heatmap (layer x step), per-head curves, an interactive explorer, where a
# trained model's tokens look among the prompts, and how the learning rate, the number of
# adapted layers and the prompt length change what opens and when.

# %%
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from adapterlab import AdapterConfig, add_adapter, load_llama, tinyworld
from adapterlab.adapter import adapted_layers, prompt_attention_map
from adapterlab.data import format_prompt, instruction_dataset
from adapterlab.gates import GateLog, explorer, format_summary, gate_record, plot_head_curves, plot_heatmap, summarize
from adapterlab.train import TrainConfig, train
from adapterlab.exercises import check_adapted_layers, check_most_open_layer

torch.manual_seed(0)
plt.rcParams.update({"figure.dpi": 72, "figure.figsize": (7, 3)})
world, train_records, heldout_records = tinyworld.load_world()

# %% [markdown]
# ## 1. Record a run
#
# With `out_dir` set, the training loop attaches a `GateRecorder`: every `log_every` steps it
# appends one JSON line with the effective gates (tanh g), the loss and the learning rate to
# `out_dir/gates.jsonl`, and draws `gates.png` at the end. The same file is what
# `adapterlab gates --follow` watches during a long run.

# %%
run_dir = Path(tempfile.mkdtemp()) / "gates-run"
model = load_llama("tinyworld")
tokenizer = model.tokenizer
data = instruction_dataset(train_records, tokenizer, max_seq_len=256)
add_adapter(model, AdapterConfig(prompt_len=10, layers=4), seed=0)
config = TrainConfig(steps=100, batch_size=32, lr=2e-2, warmup_steps=10, log_every=5, checkpoint=False,
                     out_dir=str(run_dir), seed=0, desc="adapter tuning")
metrics = train(model, data, config)
print(sorted(p.name for p in run_dir.iterdir()))
print((run_dir / "gates.jsonl").read_text().splitlines()[1][:160], "...")

# %%
# NBVAL_CHECK_OUTPUT
log = GateLog.read(run_dir)
print("gates array is (records, adapted layers, heads):",
      log.gates.shape == (len(log.steps), len(adapted_layers(model)), model.config.n_heads))
print("adapted layers are the layers with an adapter:", log.layers == adapted_layers(model))
print("all gates exactly 0 at step 0:", bool((log.gates[0] == 0).all()))

# %%
print(format_summary(summarize(log)))

# %% [markdown]
# ## 2. Pictures
#
# The heatmap shows, for every adapted layer, the mean |gate| over its heads, step by step.
# The curves show the heads of one layer. A gate can open either way: a negative gate
# *subtracts* its prompts' contribution from the attention output. Under the curves of every
# layer we count the signs at the last record.

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 3.2))
plot_heatmap(log, axes[0])
plot_head_curves(log, layer=log.layers[-1], ax=axes[1])
fig.tight_layout();

# %%
fig, axes = plt.subplots(1, len(log.layers), figsize=(13, 2.6), sharey=True)
for ax, layer in zip(axes, log.layers):
    plot_head_curves(log, layer=layer, ax=ax)
    ax.set_title(f"layer {layer}", fontsize=10)
fig.tight_layout()
for layer, last in zip(log.layers, log.gates[-1]):  # last: (H,)
    print(f"layer {layer} at step {log.steps[-1]}: {int((last > 0).sum())} heads positive, {int((last < 0).sum())} negative, "
          f"largest |gate| {np.abs(last).max():.2f}")

# %% [markdown]
# The explorer puts the three views together: drag the slider along the recorded steps, pick
# a layer and a subset of heads.

# %%
explorer(log)

# %% [markdown]
# ## 3. Where do the trained model's tokens look?
#
# In Eq. 7 the prompt block of each attention row is `gate * softmax(Q P_k^T / sqrt(d))`.
# `prompt_attention_map` captures the queries that reach the top adapter (a forward hook) and
# returns that block; we draw it for one held-out question: which prompt does each token read, and how loud (the gate)?

# %%
model.eval()
record = heldout_records[0]
text = format_prompt(record["instruction"], record["input"]) + " " + record["output"]
tokens = torch.tensor([tokenizer.encode(text)])
layer = adapted_layers(model)[-1]
gates = model.layers[layer].attention.adapter.gate_value().detach().flatten()  # (H,)
block = prompt_attention_map(model, tokens, layer)[0]  # (H, T, K): gate x prompt softmax, per head

pieces = [tokenizer.decode([t]) if t > 2 else "<s>" for t in tokens[0].tolist()]
show = list(range(len(pieces) - 14, len(pieces)))  # the end of the prompt and the answer
fig, axes = plt.subplots(1, len(gates), figsize=(13, 4), sharey=True)
vmax = block.abs().max().item()
for h, ax in enumerate(axes):
    ax.imshow(block[h, show], cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="auto")
    ax.set_title(f"head {h}, gate {gates[h].item():+.2f}", fontsize=9)
    ax.set_xlabel("prompt")
axes[0].set_yticks(range(len(show)), [pieces[i] for i in show], fontsize=8)
fig.suptitle(f"Layer {layer}: gate x prompt attention (red < 0 < blue) while reading the answer", fontsize=10)
fig.tight_layout();

# %% [markdown]
# ## 4. What changes what opens, and when
#
# Short runs (`STEPS` = 40 steps) with one setting changed at a time from (lr 2e-2, L = 4 layers,
# K = 10 prompts). For each run we keep every gate record (a callback that calls
# `gate_record` at every step, with the step's loss) and the held-out accuracy at the end. The
# cell prints how long the runs took on your machine.

# %%
STEPS = 40


def short_run(lr=2e-2, layers=4, prompt_len=10, steps=STEPS):
    model = load_llama("tinyworld")
    add_adapter(model, AdapterConfig(prompt_len=prompt_len, layers=layers), seed=0)
    records = []
    record = lambda step, info: records.append(gate_record(info["model"], step, info["epoch"], info["loss"], info["lr"]))
    config = TrainConfig(steps=steps, batch_size=32, lr=lr, warmup_steps=5, checkpoint=False, progress=False, seed=0)
    metrics = train(model, data, config, callbacks=[record])
    model.eval()
    return {"log": GateLog.from_records(records), "loss": metrics["final_loss"],
            "accuracy": tinyworld.heldout_accuracy(model, tokenizer, heldout_records)}


start = time.time()
sweeps = {
    "learning rate": {f"lr {lr:g}": short_run(lr=lr) for lr in (5e-3, 2e-2, 6e-2)},
    "adapted layers L": {f"L = {L}": short_run(layers=L) for L in (1, 2)},
    "prompt length K": {f"K = {K}": short_run(prompt_len=K) for K in (1, 40)},
}
baseline = sweeps["learning rate"]["lr 0.02"]
sweeps["adapted layers L"]["L = 4"] = baseline
sweeps["prompt length K"] = {"K = 1": sweeps["prompt length K"]["K = 1"], "K = 10": baseline,
                             "K = 40": sweeps["prompt length K"]["K = 40"]}
n_runs = len({id(run) for runs in sweeps.values() for run in runs.values()})
print(f"{n_runs} runs of {STEPS} steps: {time.time() - start:.0f} s")

# %%
fig, axes = plt.subplots(1, 3, figsize=(14, 3.3), sharey=True)
for ax, (name, runs) in zip(axes, sweeps.items()):
    for label, run in runs.items():
        g = run["log"]
        ax.plot(g.steps, np.abs(g.gates).mean(axis=(1, 2)), label=label)
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
axes[0].set_ylabel("mean |gate| over all layers and heads")
fig.tight_layout();

# %% [markdown]
# The table: for each run, the mean training loss of its last 10 steps, the held-out accuracy,
# and the final mean |gate| of each adapted layer.

# %%
def late_loss(run):  # mean loss of the last 10 steps: steadier than one batch's loss
    return float(np.nanmean(run["log"].loss[-10:]))


for name, runs in sweeps.items():
    print(name)
    for label, run in runs.items():
        g = run["log"]
        per_layer = np.abs(g.gates[-1]).mean(-1)
        print(f"   {label:10s} loss {late_loss(run):.3f}  held-out acc {run['accuracy']:.2f}  "
              f"final mean|gate| per layer {({l: round(float(v), 2) for l, v in zip(g.layers, per_layer)})}")

# %% [markdown]
# What to look for. One thing holds for every seed: the gates start at exactly 0 and are the
# only tensors with a gradient at step 0 (notebook 3), and AdamW moves each of them by about
# `lr` per step, so the learning rate sets how fast they open (checked below). What the number
# of adapted layers and the prompt length change is *read from the runs*, not written in
# advance: the next cell says it in words from the table. One seed and a short budget: small
# differences are noise (notebooks 5 and 7 train longer). For the scale of the effect in the
# paper (Table 4, ScienceQA, full training): 10, 20, 30 adapted layers gave 55.95%, 73.36%, 83.85%.

# %%
def describe(name, runs):
    gate = {label: float(np.abs(run["log"].gates[-1]).mean()) for label, run in runs.items()}
    loss = {label: late_loss(run) for label, run in runs.items()}
    acc = {label: run["accuracy"] for label, run in runs.items()}
    wide, narrow = max(gate, key=gate.get), min(gate, key=gate.get)
    low, high = min(loss, key=loss.get), max(loss, key=loss.get)
    print(f"{name}: gates widest with {wide} (mean |gate| {gate[wide]:.2f}), narrowest with {narrow} "
          f"({gate[narrow]:.2f}); loss lowest with {low} ({loss[low]:.3f}), highest with {high} ({loss[high]:.3f}).")
    best, worst = max(acc, key=acc.get), min(acc, key=acc.get)
    if acc[best] - acc[worst] < 0.1:
        print(f"   held-out accuracy {acc[worst]:.2f}-{acc[best]:.2f} for every setting: after {STEPS} steps it "
              "does not tell them apart.")
    else:
        print(f"   held-out accuracy best with {best} ({acc[best]:.2f}), worst with {worst} ({acc[worst]:.2f}).")


for name, runs in sweeps.items():
    describe(name, runs)
one, four = sweeps["adapted layers L"]["L = 1"]["log"], sweeps["adapted layers L"]["L = 4"]["log"]
top_one, top_four = np.abs(one.gates[-1][-1]).mean(), np.abs(four.gates[-1][-1]).mean()
print(f"layer 3 alone (L = 1): mean |gate| {top_one:.2f}; layer 3 among four (L = 4): {top_four:.2f} -> "
      + ("it opened wider alone." if top_one > top_four + 0.02 else
         "narrower alone." if top_one < top_four - 0.02 else "about the same (within 0.02)."))

# %%
# NBVAL_CHECK_OUTPUT
small, large = sweeps["learning rate"]["lr 0.005"]["log"], sweeps["learning rate"]["lr 0.06"]["log"]
print("after 40 steps the gates opened further with the larger learning rate:",
      np.abs(large.gates[-1]).mean() > np.abs(small.gates[-1]).mean())
print("a run with L = 1 records gates for one layer only:", sweeps["adapted layers L"]["L = 1"]["log"].layers == [3])

# %% [markdown]
# ## Check yourself
#
# **Exercise 1.** On the tiny base (N = 4 layers), which layer indices get an adapter with
# `AdapterConfig(layers=2)`? Answer without running `add_adapter`.

# %%
layers_with_adapter = None  # <- a set of layer indices, e.g. {0, 1}
check_adapted_layers(layers_with_adapter, n_layers=4, layers=2)

# %% [markdown]
# **Exercise 2.** In the run of section 1 (`log`), which adapted layer has the largest mean
# |gate| over its heads at the last record? Compute it from `log.gates`.

# %%
most_open_layer = None  # <- a layer index
check_most_open_layer(most_open_layer, log)

# %% [markdown]
# Worked solutions: `notebooks/solutions/06_gate_dynamics_solutions.ipynb`.
#
# ## Summary
#
# - A run with `out_dir` writes `gates.jsonl` (one line per logged step) and `gates.png`;
#   `GateLog` reads it back as arrays (records x layers x heads).
# - Gates open from exactly 0, positive or negative (a negative gate subtracts its prompts).
# - The explorer widget shows layer x step, per-head curves and per-layer bars together.
# - The learning rate sets how fast gates open (AdamW moves each by about `lr` per step).
#   What L and K change in a short run is printed from the runs, not assumed; one seed and
#   40 steps, so small differences are noise.
