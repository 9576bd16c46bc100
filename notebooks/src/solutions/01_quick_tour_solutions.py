# %% [markdown]
# # 1. Quick tour: worked solution
#
# The "check yourself" exercise of `../01_quick_tour.ipynb`. Try it there first: the checker
# tells you which mistake it sees.

# %%
from adapterlab.exercises.zero_init_attention import check_step0_gradients

# %% [markdown]
# ## Which tensors get a non-zero gradient at step 0?
#
# - `wq`, `wk`, `wv`, `wo`, `embedding`: the base is frozen (`requires_grad=False`); they never
#   get a gradient.
# - `prompt`: the prompts reach the output only through tanh(g) * softmax(Q P_k^T / sqrt(d)) P_v,
#   and tanh(0) = 0. The loss does not depend on them yet, so their gradient is exactly 0.
# - `gate`: d tanh(g)/dg = 1 at g = 0, times the prompt attention output, which is not 0.
#
# So only the gate. After the first step the gate is no longer 0 and the prompts start to learn.

# %%
# NBVAL_CHECK_OUTPUT
check_step0_gradients({"gate"})
