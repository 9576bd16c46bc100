# %% [markdown]
# # 2. LLaMA from its blocks: worked solutions
#
# Solutions to the "check yourself" exercises of `../02_llama_from_blocks.ipynb`. Try them
# there first: the checkers tell you which mistake they see.

# %%
import torch

from adapterlab.model import LlamaConfig
from adapterlab.exercises.llama_from_blocks import check_kv_cache_bytes, check_llama_param_count, check_rmsnorm

# %% [markdown]
# ## Exercise 1: RMSNorm as a function
#
# Mean of the squares over the **last** dimension (each token on its own), `eps` **inside**
# the square root, no mean subtracted, and the learned weight at the end. `torch.rsqrt` is
# 1/sqrt.

# %%
# NBVAL_CHECK_OUTPUT
def my_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    mean_square = x.pow(2).mean(dim=-1, keepdim=True)  # (..., 1)
    return x * torch.rsqrt(mean_square + eps) * weight


check_rmsnorm(my_rmsnorm)

# %% [markdown]
# ## Exercise 2: parameters of LLaMA-13B
#
# Term by term, with C = 5120, N = 40 layers, V = 32000 and the SwiGLU width
# F = 2/3 * 4C = 13653, rounded up to a multiple of 256 = 13824:
#
# | part | count |
# |---|---|
# | token embedding | V C |
# | per block: wq, wk, wv, wo (no grouped-query: all C x C) | 4 C^2 |
# | per block: w1, w3 (C -> F), w2 (F -> C) | 3 C F |
# | per block: two RMSNorm weights | 2 C |
# | final RMSNorm | C |
# | output head (not tied to the embedding) | V C |

# %%
# NBVAL_CHECK_OUTPUT
C, N, V = 5120, 40, 32000
F = LlamaConfig(dim=C, n_layers=N, n_heads=40).ffn_hidden_dim
print("feed-forward width F =", F)
answer = V * C + N * (4 * C * C + 3 * C * F + 2 * C) + C + V * C
print(f"{answer:,}")
check_llama_param_count(answer)

# %% [markdown]
# ## Exercise 3: the KV cache of LLaMA-7B
#
# For every layer and every token the cache keeps one key and one value vector per key/value
# head: 2 x N x T x n_kv_heads x d numbers, 2 bytes each in fp16. LLaMA-7B has N = 32,
# 32 key/value heads of width d = 128.

# %%
# NBVAL_CHECK_OUTPUT
layers, tokens, kv_heads, d, bytes_per_number = 32, 2048, 32, 128, 2
kv_bytes = 2 * layers * tokens * kv_heads * d * bytes_per_number
print(f"{kv_bytes:,} bytes = {kv_bytes / 2**30} GiB")
check_kv_cache_bytes(kv_bytes)

# %% [markdown]
# One GiB per 2048-token sequence: a batch of 16 such sequences needs 16 GiB of cache on
# top of the 12.6 GiB (6.7 billion x 2 bytes) of fp16 weights. With grouped-query attention
# (8 key/value heads instead of 32) the cache would be 4 times smaller.
