# %% [markdown]
# # 7. Ablations: worked solution
#
# The "check yourself" exercise of `../07_ablations.ipynb`.

# %%
import torch

from adapterlab import AdapterConfig, Llama, LlamaConfig, add_adapter
from adapterlab.adapter import count_trainable
from adapterlab.exercises.ablations import check_training_state_bytes

# %% [markdown]
# ## Training state of full fine-tuning vs the adapter
#
# AdamW keeps two running averages per trainable parameter (`exp_avg` and `exp_avg_sq`), and
# backward writes one gradient per trainable parameter. With the weight itself that is 4 fp32
# values = 16 bytes per trainable parameter. Frozen weights need none of the three extras: in
# the adapter's case they only have to be *stored* (in fp16, 2 bytes each, as the release does).

# %%
# NBVAL_CHECK_OUTPUT
with torch.device("meta"):
    llama7b = Llama(LlamaConfig())
n_full = llama7b.num_params()
add_adapter(llama7b, AdapterConfig(prompt_len=10, layers=30))
n_adapter = count_trainable(llama7b)

full_ft_bytes = 4 * 4 * n_full  # weight, gradient, exp_avg, exp_avg_sq; 4 bytes each
adapter_bytes = 4 * 4 * n_adapter
print(check_training_state_bytes(full_ft_bytes, n_params=n_full))
print(check_training_state_bytes(adapter_bytes, n_params=n_adapter))

# %% [markdown]
# About 108 GB of training state for full fine-tuning (more than one 80 GB GPU before a single
# activation is stored) against 20 MB for the adapter, plus 13.5 GB for the frozen fp16 base.
# That, not the speed of one step, is the main saving of Table 3.

# %%
# NBVAL_CHECK_OUTPUT
print(f"frozen fp16 base: {(n_full) * 2 / 1e9:.1f} GB")

# %% [markdown]
# The same count for the LoRA baseline of Table 3 (Alpaca-LoRA: rank 8 on `W_q`, `W_v` of every
# layer): 4.2M trainable values, between the adapter and full fine-tuning.

# %%
# NBVAL_CHECK_OUTPUT
from adapterlab.studies.baselines import LoRAConfig, lora_param_count

n_lora = lora_param_count(LoRAConfig(rank=8, alpha=16, targets=("wq", "wv")), LlamaConfig())
print(f"LoRA: {n_lora:,} trainable values, {4 * 4 * n_lora / 1e6:.0f} MB of training state")
