# %% [markdown]
# # 9. Multi-modal: worked solution
#
# The "check yourself" exercise of `../09_multimodal.ipynb`.

# %%
import torch

from adapterlab.vision import VisualProjection
from adapterlab.exercises import check_multimodal_param_count

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
# Most of it is the projection's C x C matrix (16.8M). The paper's 1.8M total (1.2M prompts +
# 0.6M projection) implies a much narrower projection; a narrower hidden width would shrink
# this library's count the same way.
