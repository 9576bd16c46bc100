# %% [markdown]
# # 6. Gate dynamics: worked solutions
#
# The "check yourself" exercises of `../06_gate_dynamics.ipynb`.

# %%
import tempfile
from pathlib import Path

import numpy as np

from adapterlab import AdapterConfig, add_adapter, load_llama
from adapterlab.worlds import tinyworld
from adapterlab.adapter import adapted_layers
from adapterlab.data import instruction_dataset
from adapterlab.gates import GateLog, GateRecorder
from adapterlab.train import TrainConfig, train
from adapterlab.exercises.gate_dynamics import check_adapted_layers, check_most_open_layer

# %% [markdown]
# ## Exercise 1: which layers get an adapter?
#
# LLaMA-Adapter inserts prompts in the **top** L layers: with N = 4 and L = 2 that is layers
# N - L .. N - 1 = 2 and 3 (indices start at 0).

# %%
# NBVAL_CHECK_OUTPUT
N, L = 4, 2
layers_with_adapter = set(range(N - L, N))
check_adapted_layers(layers_with_adapter, n_layers=N, layers=L)

# %% [markdown]
# `add_adapter` agrees:

# %%
# NBVAL_CHECK_OUTPUT
model = load_llama("tinyworld")
add_adapter(model, AdapterConfig(prompt_len=10, layers=2))
print(adapted_layers(model))

# %% [markdown]
# ## Exercise 2: the most open layer
#
# Take the last record of the log (`log.gates[-1]`, shape (layers, heads)), average the
# **absolute** gates over the heads (gates may be negative), and take the layer with the
# largest mean. `log.layers` maps row numbers to layer indices. Here on a short run of 30 steps;
# the same code answers the exercise for the notebook's run.

# %%
world, train_records, heldout_records = tinyworld.load_world()
model = load_llama("tinyworld")
data = instruction_dataset(train_records, model.tokenizer, max_seq_len=256)
add_adapter(model, AdapterConfig(prompt_len=10, layers=4), seed=0)
run_dir = Path(tempfile.mkdtemp()) / "short-run"
train(model, data, TrainConfig(steps=30, batch_size=32, lr=2e-2, warmup_steps=5, log_every=5, checkpoint=False,
                               out_dir=str(run_dir), progress=False, seed=0), callbacks=[GateRecorder(run_dir, every=5)])
log = GateLog.read(run_dir)

# %%
# NBVAL_CHECK_OUTPUT
mean_abs = np.abs(log.gates[-1]).mean(axis=-1)  # (layers,)
most_open_layer = log.layers[int(mean_abs.argmax())]
check_most_open_layer(most_open_layer, log).correct

# %%
check_most_open_layer(most_open_layer, log)
