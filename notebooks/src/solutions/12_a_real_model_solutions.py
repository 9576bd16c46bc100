# %% [markdown]
# # 12. A real model: worked solution
#
# The "check yourself" exercise of `../12_a_real_model.ipynb`. No training here: the count follows
# from the model's shape, and attaching the adapter to the real model confirms it.

# %%
from adapterlab import AdapterConfig, add_adapter, load_llama
from adapterlab.adapter import count_trainable
from adapterlab.exercises.a_real_model import check_gqa_adapter_param_count

model = load_llama("smollm2")
c = model.config
print(f"layers {c.n_layers}, width C = {c.dim}, query heads H = {c.n_heads}, key/value heads {c.n_kv_heads}")

# %% [markdown]
# ## How many values does the adapter train at K = 10, L = 30?
#
# Per adapted layer the adapter learns one prompt P_l of K tokens, each a vector in the
# **residual width** C (the prompts enter the layer like tokens), and one gate per **query head**
# (the gate scales what each head takes from the prompts, Eq. 7). Grouped-query attention only
# narrows the keys and values, and those are computed from the prompt by the frozen W_k and W_v:
# nothing of that width is trained.

# %%
# NBVAL_CHECK_OUTPUT
K, L = 10, 30
prompts, gates = K * L * c.dim, L * c.n_heads
n_trainable_L30 = prompts + gates
print(f"K*L*C = {prompts:,}, L*H = {gates}, total {n_trainable_L30:,}")
check_gqa_adapter_param_count(n_trainable_L30, c)

# %% [markdown]
# The same number, counted on the real model with the adapter attached, and the width of the
# frozen key projection that turns a prompt into its (narrower) keys:

# %%
# NBVAL_CHECK_OUTPUT
add_adapter(model, AdapterConfig(prompt_len=K, layers=L))
print("counted on the model:", count_trainable(model) == n_trainable_L30)
print("trainable tensors per layer:", {name.split(".")[-1]: tuple(p.shape)
                                       for name, p in model.layers[0].named_parameters() if p.requires_grad})
print("W_k (frozen) maps C to the key/value width:", tuple(model.layers[0].attention.wk.weight.shape))
