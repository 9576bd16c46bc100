# %% [markdown]
# # 8. Several GPUs: worked solution
#
# The "check yourself" exercise of `../08_multi_gpu.ipynb`.

# %%
from adapterlab.data import check_batch_sizes
from adapterlab.exercises.multi_gpu import check_accumulation_steps

# %% [markdown]
# ## Micro-batches per GPU per step
#
# The global batch of 64 is split over the 8 ranks: 8 examples each. With
# `--micro-batch-size 4`, each rank runs 2 forward/backward passes of 4 examples, summing their
# gradients, then all ranks average their gradients (one all-reduce) and take the same step.

# %%
# NBVAL_CHECK_OUTPUT
global_batch, gpus, micro = 64, 8, 4
per_gpu = global_batch // gpus
micro_batches_per_step = per_gpu // micro
check_accumulation_steps(micro_batches_per_step, global_batch=global_batch, world_size=gpus, micro_batch=micro)

# %% [markdown]
# `adapterlab.data.check_batch_sizes` is what the training loop uses to split the batch:

# %%
# NBVAL_CHECK_OUTPUT
print(check_batch_sizes(64, 8, micro_batch=4))  # (examples per rank, micro-batches per rank)
