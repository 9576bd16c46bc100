# %% [markdown]
# # 4. Pretraining the tiny LLaMA: worked solution
#
# The "check yourself" exercise of `../04_pretraining_tiny_llama.ipynb`.

# %%
import math

from adapterlab.worlds import tinyworld
from adapterlab.exercises.pretraining_tiny_llama import check_uniform_loss

# %% [markdown]
# ## The loss of a model that knows nothing
#
# Cross-entropy is the average of -log p(right token). If every one of the V tokens has
# probability 1/V, every term is -log(1/V) = log V. PyTorch uses the natural logarithm, so the
# loss is in nats: ln V. The tiny world's tokenizer has V = `tinyworld.Recipe().vocab_size` tokens.

# %%
# NBVAL_CHECK_OUTPUT
V = tinyworld.Recipe().vocab_size  # 640
uniform_loss = math.log(V)
print(f"ln({V}) = {uniform_loss:.4f} nats  (= {math.log2(V):.2f} bits)")
check_uniform_loss(uniform_loss, vocab_size=V)

# %% [markdown]
# For LLaMA's vocabulary of 32000 tokens it would be ln 32000 = 10.37. A training run whose
# first loss is far above ln V has a problem with its initialisation (logits too large).
