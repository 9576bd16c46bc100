# %% [markdown]
# # 8. Training on several GPUs (or several CPU processes)
#
# **Goal.** The paper trains LLaMA-Adapter on 8 A100 GPUs with `torchrun` and data parallelism
# (DDP). Every process ("rank") holds the frozen base and a copy of the adapter, takes its share
# of every global batch, and before each optimizer step the ranks **average the adapter's
# gradients** - 1.2M values at 7B, never the 7B frozen weights. In class, CPU processes stand in
# for GPUs (the `gloo` backend): the code is exactly the one a GPU cluster runs.
#
# We launch a 2-process run in the background, watch its gates live from the log, run the same
# training in one process, and check that both give the same gates. At the end: the command
# for LLaMA-7B on 8 GPUs.
#
# **Runtime:** about a minute on 2 CPU cores (46 s measured, the two training
# processes sharing the cores); the same with an empty cache, since the tiny base ships with the package.

# %%
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from adapterlab.worlds import tinyworld
from adapterlab.gates import GateLog, adapted_note
from adapterlab.gates.live import LiveGates, launch
from adapterlab.exercises.multi_gpu import check_accumulation_steps

plt.rcParams.update({"figure.dpi": 72})
tinyworld.build_base()  # the cached tiny base: every rank loads it from the same folder
work = Path(tempfile.mkdtemp(prefix="adapterlab-ddp-"))
torchrun = [sys.executable, "-m", "torch.distributed.run"]  # = the `torchrun` command of this Python
common = ["--base", "tinyworld", "--data", "tinyworld", "--steps", "30", "--batch-size", "32", "--lr", "2e-2",
          "--warmup-steps", "5", "--log-every", "5", "--seed", "0", "--no-progress"]

# %% [markdown]
# ## 1. Launch 2 processes with torchrun, watch the gates live
#
# `torchrun --nproc_per_node 2 -m adapterlab finetune --strategy ddp ...` starts two ranks.
# Only rank 0 writes files: it appends a gate record to `gates.jsonl` every 5 steps.
# `launch` starts the job in the background (its output goes to a log file); `LiveGates` reads the
# growing `gates.jsonl` and redraws every two seconds while the notebook stays free.

# %%
ddp_dir = work / "ddp-2"
job = launch(torchrun + ["--nproc_per_node", "2", "--standalone", "-m", "adapterlab", "finetune", "--strategy", "ddp",
                         "--out", str(ddp_dir)] + common, log=work / "ddp-2.log", env={"OMP_NUM_THREADS": "1"})
live = LiveGates(ddp_dir, process=job, interval=2.0)

# %%
live.wait()
job.wait()
print("exit code:", job.returncode)
print((work / "ddp-2.log").read_text()[-1200:])

# %% [markdown]
# ## 2. The same run in one process
#
# The same global batch of 32 examples per step, in one process. Data parallelism must not
# change the result: each rank's loss is its share of the *global* batch's mean, and averaging
# the gradients over ranks reassembles the gradient of the whole batch.

# %%
one_dir = work / "one"
subprocess.run([sys.executable, "-m", "adapterlab", "finetune", "--out", str(one_dir)] + common, check=True,
               capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
one, two = GateLog.read(one_dir), GateLog.read(ddp_dir)
difference = np.abs(one.gates - two.gates).max()
print(f"records: {len(one.steps)} and {len(two.steps)}; largest gate difference: {difference:.1e}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.2), sharey=True)
for ax, (name, g) in zip(axes, (("1 process", one), ("2 processes (DDP)", two))):
    for layer in range(g.gates.shape[1]):
        ax.plot(g.steps, g.gates[:, layer, :], color=f"C{layer}", lw=1)
    ax.set_title(f"{name}: every head's gate (colour = layer)\n{adapted_note(g)}")
    ax.set_xlabel("step")
fig.tight_layout();

# %%
# NBVAL_CHECK_OUTPUT
print("same steps recorded:", one.steps.tolist() == two.steps.tolist())
print("1 and 2 processes give the same gates (within 1e-4):", difference < 1e-4)
print("the job ran as 2 processes:", "2 processes" in (work / "ddp-2.log").read_text())

# %% [markdown]
# ## 3. The 8-GPU command for LLaMA-7B
#
# The release's recipe (the table "The release's training recipe" in `docs/method.md`; the
# 8-GPU set-up is in `docs/distributed.md`): 5 epochs, 2 of warm-up, global batch 64, base learning rate
# 9e-3 (lr = 9e-3 x 64 / 256), AdamW betas (0.9, 0.95), weight decay 0.02, K = 10 prompts in the
# top L = 30 layers, sequences up to 512 tokens. With Meta's LLaMA-7B folder and Alpaca-52K:
#
# ```bash
# torchrun --nproc_per_node 8 -m adapterlab finetune --strategy ddp \
#     --base /models/llama/7B --data alpaca_data.json --out runs/alpaca-7b \
#     --epochs 5 --warmup-epochs 2 --batch-size 64 --blr 9e-3 \
#     --weight-decay 0.02 --prompt-len 10 --adapter-layers 30 --max-seq-len 512
# ```
#
# and, in another terminal, `adapterlab gates --follow runs/alpaca-7b` to watch the gates. Each
# GPU takes 8 examples per step; if 8 x 512 tokens do not fit, add `--micro-batch-size 4` and
# every rank accumulates several micro-batches before the all-reduce: the same update, more slowly.
# Eight CPU processes on a laptop run the same code (`--nproc_per_node 8`), just slowly.
#
# ## Check yourself
#
# **Exercise.** The 8-GPU command above with `--micro-batch-size 4`: how many forward/backward
# passes (micro-batches) does each GPU run before every optimizer step?

# %%
micro_batches_per_step = None  # <- your answer, an integer
check_accumulation_steps(micro_batches_per_step, global_batch=64, world_size=8, micro_batch=4)

# %% [markdown]
# Worked solution: `notebooks/solutions/08_multi_gpu_solutions.ipynb`.
#
# ## Summary
#
# - `torchrun --nproc_per_node N -m adapterlab finetune --strategy ddp` runs the same loop on N
#   ranks; only the adapter's gradients are all-reduced.
# - Rank 0 writes the run folder; `LiveGates` (or `adapterlab gates --follow`) watches the gates
#   while it trains.
# - One process and N processes train the same adapter: the gates agree to rounding.
# - The global batch is what matters: ranks and gradient accumulation only cut it differently.

# %%
shutil.rmtree(work, ignore_errors=True)
