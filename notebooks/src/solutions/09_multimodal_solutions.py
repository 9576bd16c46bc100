# %% [markdown]
# # 9. Multi-modal: worked solution
#
# The "check yourself" exercise of `../09_multimodal.ipynb`.

# %%
import torch

from adapterlab.adapter import VisualProjection
from adapterlab.exercises.multimodal import check_multimodal_param_count

# %% [markdown]
# ## Trainable values of the multi-modal adapter at 7B
#
# Three parts: the prompts (K x C per adapted layer), the gates (H per adapted layer), and
# **one** projection shared by all layers (the image token is made once and added to every
# layer's prompts). A `Linear(a, b)` has a*b weights and b biases; a `LayerNorm(n)` has n weights
# and n biases. Rather than trusting a formula, we count the modules as printed:

# %%
K, L, C, H, visual_dim = 10, 30, 4096, 32, 1024
projection = VisualProjection(visual_dim, C)
per_module = {name: sum(p.numel() for p in m.parameters()) for name, m in projection.named_children()}
for name, count in per_module.items():
    print(f"{name:9s} {count:>12,}")
n_multimodal = K * L * C + L * H + sum(per_module.values())
check_multimodal_param_count(n_multimodal, visual_dim=visual_dim)

# %%
# NBVAL_CHECK_OUTPUT
print("correct:", check_multimodal_param_count(n_multimodal, visual_dim=visual_dim).correct)

# %% [markdown]
# The prompts are 1,228,800 of these values and the projection 669,824: the paper's "1.2M
# prompts + 0.6M projection". The projection is a bottleneck - visual_dim -> 128 -> C - so most
# of it is the 128 x 4096 matrix that writes the image token into the residual width. With a
# hidden width of C instead it would be 21M values, more than ten times the prompts.
