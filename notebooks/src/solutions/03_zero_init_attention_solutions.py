# %% [markdown]
# # 3. Zero-init attention: worked solutions
#
# Solutions to the "check yourself" exercises of `../03_zero_init_attention.ipynb`. Try them
# there first: the checkers tell you which mistake they see.

# %%
import math

import torch

from adapterlab.exercises.zero_init_attention import check_adapter_param_count, check_step0_gradients, check_zero_init_attention

# %% [markdown]
# ## Exercise 1: Eq. 5-8 by hand
#
# 1. Concatenate prompt and token keys (and values): the prompt tensors have batch size 1 and
#    are shared, so `expand` them to the batch.
# 2. Eq. 5: one score matrix, divided by sqrt(d). Eq. 6: split it after the K prompt columns.
# 3. Eq. 7: **two** softmaxes. The token part gets the causal mask; every token sees all
#    prompts. The gate multiplies the prompt part only.
# 4. Eq. 8: multiply by the concatenated values.

# %%
# NBVAL_CHECK_OUTPUT
def my_zero_init_attention(q, k, v, prompt_k, prompt_v, gate):
    B, H, T, d = q.shape
    K = prompt_k.shape[2]
    keys = torch.cat([prompt_k.expand(B, -1, -1, -1), k], dim=2)  # (B, H, K+T, d)
    values = torch.cat([prompt_v.expand(B, -1, -1, -1), v], dim=2)
    S = q @ keys.transpose(-2, -1) / math.sqrt(d)  # Eq. 5: (B, H, T, K+T)
    S_K, S_tokens = S[..., :K], S[..., K:]  # Eq. 6
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    S_tokens = S_tokens.masked_fill(~causal, float("-inf"))
    S_g = torch.cat([gate * S_K.softmax(-1), S_tokens.softmax(-1)], dim=-1)  # Eq. 7
    return S_g @ values  # Eq. 8 (before W_o)


check_zero_init_attention(my_zero_init_attention)

# %% [markdown]
# ## Exercise 2: trainable values at 7B
#
# One prompt matrix P_l of K x C values in each adapted layer, and one gate per head in each
# adapted layer. There are no new projections: the prompts go through the frozen W_k, W_v.

# %%
# NBVAL_CHECK_OUTPUT
K, L, C, H = 10, 30, 4096, 32
n_trainable = K * L * C + L * H
print(f"prompts {K * L * C:,} + gates {L * H:,} = {n_trainable:,}")
check_adapter_param_count(n_trainable)

# %% [markdown]
# In fp32 that is 1,229,760 x 4 bytes = 4.9 MB (4.7 MiB): the size of the released adapter
# file, against 13 GB for the fp16 base model.
#
# ## Exercise 3: who gets a gradient at step 0?
#
# The base is frozen, so W_q, W_k, W_v, W_o and the embedding never get a gradient. The
# prompts reach the output only through tanh(g) * softmax(Q P_k^T / sqrt(d)) P_v with
# tanh(0) = 0: the loss does not depend on them at step 0, so their gradient is exactly zero.
# The gate's gradient is tanh'(0) = 1 times that prompt attention output, which is not zero.

# %%
# NBVAL_CHECK_OUTPUT
nonzero_at_step0 = {"gate"}
check_step0_gradients(nonzero_at_step0)
