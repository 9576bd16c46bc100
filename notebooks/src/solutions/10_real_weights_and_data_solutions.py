# %% [markdown]
# # 10. Real weights and data: worked solution
#
# The "check yourself" exercise of `../10_real_weights_and_data.ipynb`.

# %%
import torch

from adapterlab.exercises.real_weights_and_data import check_hf_to_meta_rows

# %% [markdown]
# ## From Hugging Face's q/k rows to Meta's
#
# Inside one head, HF's row `c*d/2 + i` (half c of pair i) must become Meta's row `2i + c`.
# Reshape the rows of each head as a `(2, d/2)` grid (c, i), swap to `(d/2, 2)` (i, c), and
# flatten: row-major order of (i, c) is exactly 2i + c.

# %%
# NBVAL_CHECK_OUTPUT
def my_hf_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, -1).transpose(1, 2).reshape(w.shape)


check_hf_to_meta_rows(my_hf_to_meta)

# %% [markdown]
# On one head of width 8, numbering HF's rows: Meta wants the first pair (HF rows 0 and 4)
# first, then the second pair (1 and 5), and so on.

# %%
# NBVAL_CHECK_OUTPUT
rows = torch.arange(8).reshape(8, 1)
print(my_hf_to_meta(rows, n_heads=1).flatten().tolist())
