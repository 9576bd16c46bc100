# %% [markdown]
# # 3. Zero-init attention, step by step
#
# **Goal.** Understand the one idea that makes LLaMA-Adapter work: *zero-init gated
# attention* (Sec. 3.2 of the paper, Eq. 5-8). We compute it by hand on tensors small enough
# to print, check that the library's fast form gives the same numbers, and then see its two
# consequences in a real model:
#
# 1. at initialisation the adapted model computes **exactly** what the frozen model computes;
# 2. at the first training step the **gate** gets a gradient and the **prompts do not**:
#    the gate opens first, then the prompts learn.
#
# **Runtime:** under half a minute on 2 CPU cores (8 s measured), with or without a cache.
#
# **The setting.** In each of the top L layers, LLaMA-Adapter adds K learnable *adaption
# prompts* $P_l \in \mathbb{R}^{K \times C}$. They pass through the layer's frozen $W_k$, $W_v$
# and every word token may attend to them. For a query token $t$ with earlier tokens $T$:
#
# $$Q = W_q t, \quad K = W_k [P_l; T; t], \quad V = W_v [P_l; T; t] \qquad \text{(Eq. 2-4)}$$
# $$S = Q K^\top / \sqrt{d} = [S^K; S^{M+1}] \qquad \text{(Eq. 5-6)}$$
# $$S^g = [\, g_l \cdot \mathrm{softmax}(S^K);\ \mathrm{softmax}(S^{M+1}) \,] \qquad \text{(Eq. 7)}$$
# $$\text{out} = W_o\, S^g V \qquad \text{(Eq. 8)}$$
#
# Two details carry the whole idea: the **two separate softmaxes**, and the **gate** $g_l$
# that starts at zero (the release applies it as $\tanh(g_l)$, one gate per head).

# %%
import math

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from adapterlab import AdapterConfig, Llama, LlamaConfig, add_adapter, gate_values
from adapterlab.adapter import (adapted_layers, count_trainable, gated_prompt_attention, prompt_attention_map,
                                zero_init_attention_literal)
from adapterlab.model import init_weights
from adapterlab.exercises.zero_init_attention import check_adapter_param_count, check_step0_gradients, check_zero_init_attention

torch.manual_seed(0)
plt.rcParams.update({"figure.dpi": 72, "figure.figsize": (7, 3)})

# %% [markdown]
# ## 1. Small tensors
#
# One layer, one sequence, 2 heads of width d = 4, T = 5 word tokens and K = 3 prompts. The
# queries, keys and values below stand for $W_q t$, $W_k T$, $W_v T$ (keys already rotated),
# and the prompt keys/values for $W_k P_l$, $W_v P_l$ (prompts get no rotary embedding).

# %%
# NBVAL_CHECK_OUTPUT
B, H, T, K, d = 1, 2, 5, 3, 4
q, k, v = torch.randn(B, H, T, d), torch.randn(B, H, T, d), torch.randn(B, H, T, d)
prompt_k, prompt_v = torch.randn(1, H, K, d), torch.randn(1, H, K, d)  # shared by every sequence
print("q, k, v:", tuple(q.shape), " prompt_k, prompt_v:", tuple(prompt_k.shape))

# %% [markdown]
# **Eq. 5-6.** Every query is scored against the prompts *and* the tokens, in one matrix;
# the first K columns are $S^K$ (prompts), the rest $S^{M+1}$ (tokens).

# %%
# NBVAL_CHECK_OUTPUT
keys = torch.cat([prompt_k, k], dim=2)  # [P; T; t]   (B, H, K+T, d)
values = torch.cat([prompt_v, v], dim=2)
S = q @ keys.transpose(-2, -1) / math.sqrt(d)  # Eq. 5: (B, H, T, K+T)
S_K, S_M1 = S[..., :K], S[..., K:]  # Eq. 6
print("S:", tuple(S.shape), "= [S^K", tuple(S_K.shape), "; S^{M+1}", tuple(S_M1.shape), "]")

# %% [markdown]
# **Eq. 7.** Two softmaxes: one over the prompts, one over the tokens (with the usual causal
# mask: a token sees itself and earlier tokens; every token sees all prompts). The prompt
# part is multiplied by the gate. We give head 0 the gate $g=0$ (as at initialisation) and
# head 1 the gate $g=1$, so $\tanh(g) \approx 0.76$.

# %%
# NBVAL_CHECK_OUTPUT
g = torch.tensor([0.0, 1.0]).view(1, H, 1, 1)  # one learnable gate per head
gate = torch.tanh(g)  # the effective gate
causal = torch.ones(T, T, dtype=torch.bool).tril()
prompt_part = gate * S_K.softmax(-1)  # g * softmax(S^K)
token_part = S_M1.masked_fill(~causal, float("-inf")).softmax(-1)  # softmax(S^{M+1})
S_g = torch.cat([prompt_part, token_part], dim=-1)  # Eq. 7
print("attention mass on the prompts, per head:", [round(x, 4) for x in prompt_part.sum(-1)[0, :, 0].tolist()])
print("attention mass on the tokens,  per head:", [round(x, 4) for x in token_part.sum(-1)[0, :, 0].tolist()])

# %% [markdown]
# The tokens' attention still sums to exactly 1, whatever the gate: the prompts *add*
# information on top instead of taking attention away. Compare with the naive design, **one**
# softmax over prompts and tokens together: even with the gate at 0, the prompts steal part of
# the tokens' attention, so the frozen model's behaviour changes from the first step.

# %%
# NBVAL_CHECK_OUTPUT
mask = torch.cat([torch.ones(T, K, dtype=torch.bool), causal], dim=1)
one = S.masked_fill(~mask, float("-inf")).softmax(-1)  # a single softmax over [prompts, tokens]
one_gated = torch.cat([gate * one[..., :K], one[..., K:]], dim=-1)
print("two softmaxes: token attention sums to 1:", torch.allclose(token_part.sum(-1), torch.ones(B, H, T)))
print("one softmax:   token attention sums to 1:", torch.allclose(one_gated[..., K:].sum(-1), torch.ones(B, H, T)))

# %%
def show(ax, A, title):
    ax.imshow(A, cmap="viridis", vmin=0, vmax=1)
    ax.axvline(K - 0.5, color="w", lw=2)
    ax.set_xticks(range(K + T), [f"P{i}" for i in range(K)] + [f"t{i}" for i in range(T)], fontsize=8)
    ax.set_yticks(range(T), [f"t{i}" for i in range(T)], fontsize=8)
    ax.set_title(title, fontsize=9)


fig, axes = plt.subplots(1, 3, figsize=(11, 3))
show(axes[0], S_g[0, 0], "Eq. 7, gate tanh(0) = 0")
show(axes[1], S_g[0, 1], "Eq. 7, gate tanh(1) = 0.76")
show(axes[2], one_gated[0, 0], "one softmax, gate 0: tokens lose attention")
fig.suptitle("Who does each query token (row) attend to? Prompts left of the white line, tokens right", fontsize=10)
fig.tight_layout();

# %% [markdown]
# The picture on the left is ordinary causal attention: the prompts are invisible. In the
# middle the prompt block lights up, scaled by the gate, while the token block is unchanged.
# On the right the token rows are darker: that is the damage the split softmax avoids.
#
# **Eq. 8.** Multiply by the values. `zero_init_attention_literal` in `adapterlab.adapter`
# writes Eq. 5-8 exactly as above; our hand computation must agree with it.

# %%
# NBVAL_CHECK_OUTPUT
out = S_g @ values  # Eq. 8 before W_o: (B, H, T, d)
literal = zero_init_attention_literal(q, k, v, prompt_k, prompt_v, gate)
print("S^g V:", tuple(out.shape), "| equal to zero_init_attention_literal:", torch.allclose(out, literal))

# %% [markdown]
# ## 2. The efficient form
#
# Because the softmaxes are separate, $S^g V$ splits into a sum:
#
# $$S^g V = \underbrace{\mathrm{softmax}(S^{M+1})\, V_{\text{tokens}}}_{\text{ordinary causal attention}}
#  + \underbrace{g \cdot \mathrm{softmax}(Q P_k^\top/\sqrt{d})\, P_v}_{\text{the adapter's term}}$$
#
# The first term is exactly what the frozen model computes, so it can use PyTorch's fused
# `scaled_dot_product_attention`; the adapter only adds the second term,
# `gated_prompt_attention`. That is how `adapterlab`'s `Attention` runs it.

# %%
# NBVAL_CHECK_OUTPUT
tokens_term = F.scaled_dot_product_attention(q, k, v, is_causal=True)
adapter_term = gated_prompt_attention(q, prompt_k, prompt_v, gate)
fast = tokens_term + adapter_term
print("sum form == literal Eq. 5-8 (within 1e-6):", torch.allclose(fast, literal, atol=1e-6))
print("head 0 (gate 0): adapter term is exactly zero:", bool((adapter_term[:, 0] == 0).all()))

# %%
print(f"largest difference between the two forms: {(fast - literal).abs().max().item():.1e}")

# %% [markdown]
# ## 3. In a whole model: the output is identical at initialisation
#
# Now a small random LLaMA (4 layers). `add_adapter` attaches prompts to the top L = 2 layers,
# freezes the base, and starts every gate at 0. Since $\tanh(0)=0$, the adapter's term is
# exactly zero and the logits must not change **in a single bit**.

# %%
# NBVAL_CHECK_OUTPUT
config = LlamaConfig(dim=64, n_layers=4, n_heads=4, vocab_size=100, multiple_of=32, max_seq_len=64)
model = init_weights(Llama(config), seed=0)
tokens = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    before = model(tokens)

add_adapter(model, AdapterConfig(prompt_len=5, layers=2))
with torch.no_grad():
    after = model(tokens)
print("adapted layers:", adapted_layers(model))
print("trainable:", count_trainable(model), "of", f"{model.num_params():,}", "parameters")
print("   = K*L*C prompts", 5 * 2 * 64, "+ L*H gates", 2 * 4)
print("gates (L, H):", gate_values(model).tolist())
print("logits bit-for-bit identical at init:", torch.equal(before, after))

# %% [markdown]
# ## 4. Step 0: who gets a gradient?
#
# Take one next-token loss and backpropagate. The prompts enter the output only through
# $\tanh(g)\cdot\mathrm{softmax}(\dots)P_v$, and $\tanh(0) = 0$, so the loss does not depend on
# them yet: their gradient is exactly zero. The gate's gradient is
# $\tanh'(0) = 1$ times the prompt attention output, which is not zero.

# %%
def next_token_loss(model, tokens):
    logits = model(tokens)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


adapters = [model.layers[i].attention.adapter for i in adapted_layers(model)]
loss = next_token_loss(model, tokens)
loss.backward()

# %%
# NBVAL_CHECK_OUTPUT
for i, ap in zip(adapted_layers(model), adapters):
    print(f"layer {i}: prompt gradient all zero: {bool((ap.prompt.grad == 0).all())}, "
          f"every head's gate has a gradient: {bool((ap.gate.grad != 0).all())}")
print("frozen base weights get no gradient:", model.layers[3].attention.wq.weight.grad is None)

# %% [markdown]
# After one optimizer step the gates are no longer 0, and from then on the prompts learn too.

# %%
# NBVAL_CHECK_OUTPUT
opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
opt.step()
opt.zero_grad()
next_token_loss(model, tokens).backward()
print("after one step, gates open:", bool((gate_values(model) != 0).all()))
print("after one step, every prompt has a gradient:", all(bool((ap.prompt.grad != 0).any()) for ap in adapters))
opt.zero_grad()

# %% [markdown]
# Let us watch that happen over 60 steps of learning to continue these two sequences
# (AdamW, as in the paper's recipe). We record the gates and the size of the prompt gradient.
# Under the plots, the numbers behind "the gate opens first": the first step at which the
# prompts get a gradient, and the gradient norms at the start and the end.

# %%
torch.manual_seed(0)
model = init_weights(Llama(config), seed=0)
add_adapter(model, AdapterConfig(prompt_len=5, layers=2))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, betas=(0.9, 0.95))
history = {"loss": [], "gates": [], "prompt_grad": [], "gate_grad": []}
for step in range(60):
    loss = next_token_loss(model, tokens)
    loss.backward()
    adapters = [model.layers[i].attention.adapter for i in adapted_layers(model)]
    history["loss"].append(loss.item())
    history["gates"].append(gate_values(model).flatten())  # (L*H,)
    history["prompt_grad"].append(sum(ap.prompt.grad.norm() ** 2 for ap in adapters).sqrt().item())
    history["gate_grad"].append(sum(ap.gate.grad.norm() ** 2 for ap in adapters).sqrt().item())
    opt.step()
    opt.zero_grad()

gates = torch.stack(history["gates"])  # (steps, L*H)
fig, axes = plt.subplots(1, 3, figsize=(12, 3))
axes[0].plot(history["loss"])
axes[0].set_title("training loss")
axes[1].plot(gates)
axes[1].set_title(f"tanh(gate), one line per head\n{len(adapted_layers(model))} of {model.config.n_layers} layers adapted")
axes[2].plot(history["gate_grad"], label="gates")
axes[2].plot(history["prompt_grad"], label="prompts")
axes[2].set_title("gradient norm")
axes[2].set_yscale("symlog", linthresh=1e-3)
axes[2].legend()
for ax in axes:
    ax.set_xlabel("step")
fig.tight_layout()
first = next((s for s, n in enumerate(history["prompt_grad"]) if n > 0), None)
print(f"prompt gradient norm: {history['prompt_grad'][0]:.1e} at step 0, first non-zero at step {first}, "
      f"{history['prompt_grad'][-1]:.1e} at step {len(history['prompt_grad']) - 1}")
print(f"gate gradient norm:   {history['gate_grad'][0]:.1e} at step 0, {history['gate_grad'][-1]:.1e} at the end")
print(f"loss: {history['loss'][0]:.3f} at step 0 -> {history['loss'][-1]:.3f} at step {len(history['loss']) - 1}")

# %%
# NBVAL_CHECK_OUTPUT
print("in the 60-step run, the prompts' gradient is exactly 0 at step 0 and non-zero at step 1:",
      history["prompt_grad"][0] == 0 and history["prompt_grad"][1] > 0)

# %% [markdown]
# ## 5. The contrast: gates that do not start at zero
#
# The paper's ablation (Table 5) initialises the gates randomly instead. Then the adapter
# disturbs the frozen model from the start and the prompts, random vectors, get a gradient at
# once - the pretrained knowledge is perturbed by noise before anything is learned.

# %%
# NBVAL_CHECK_OUTPUT
noisy = init_weights(Llama(config), seed=0)
add_adapter(noisy, AdapterConfig(prompt_len=5, layers=2, init="random"))
noisy_logits = noisy(tokens)
print("random-init gates: logits identical at init:", torch.equal(before, noisy_logits.detach()))
F.cross_entropy(noisy_logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
print("random-init gates: prompts get a gradient at step 0:",
      all(bool((noisy.layers[i].attention.adapter.prompt.grad != 0).any()) for i in adapted_layers(noisy)))

# %%
print(f"largest change of a logit at init with random gates: {(noisy_logits.detach() - before).abs().max().item():.3f}")

# %% [markdown]
# ## 6. How much attention goes to the prompts?
#
# In Eq. 7 the prompt block of every row sums to the gate of its head, while the token block
# sums to 1. So after training, the gate *is* the share of attention each head gives to the
# prompts (negative gates subtract what the prompts say). Which prompt a token reads depends
# on the token: `prompt_attention_map` captures the queries that reach the top adapter with a
# forward hook and returns that block. On the right we divide it by the gate again, which leaves
# the prompt softmax itself (every row sums to 1) of the head whose gate opened most; the line
# under the plot says how far it is from uniform in this random toy model (a trained model's
# map is in notebook 6).

# %%
layer = adapted_layers(model)[-1]
gate_top = model.layers[layer].attention.adapter.gate_value().detach().flatten()  # (H,)
head = int(gate_top.abs().argmax())
prompt_block = prompt_attention_map(model, tokens, layer)[0, head]  # (T, K): gate x softmax(Q P_k^T / sqrt d)

g_all = gate_values(model)  # (L, H)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.2), gridspec_kw={"width_ratios": [3, 2]})
x = torch.arange(config.n_heads)
for j, (i, row) in enumerate(zip(adapted_layers(model), g_all)):
    axes[0].bar(x + 0.4 * j - 0.2, row, 0.4, label=f"layer {i}")
axes[0].axhline(0, color="k", lw=0.5)
axes[0].set_xticks(x, [f"head {h}" for h in x.tolist()])
axes[0].set_ylabel("prompt attention mass (= tanh g)")
axes[0].set_title("Token attention is 1 per row; prompts add tanh(g)", fontsize=10)
axes[0].legend(fontsize=8)
softmax_block = prompt_block / gate_top[head]  # (T, K): undo the gate, each row sums to 1
im = axes[1].imshow(softmax_block, aspect="auto", cmap="viridis")
axes[1].set_xlabel("prompt")
axes[1].set_ylabel("token")
axes[1].set_title(f"layer {layer}, head {head} (gate {gate_top[head].item():+.2f}): softmax(Q P_k^T / sqrt d),\n"
                  "the prompt block divided by its gate", fontsize=10)
fig.colorbar(im, ax=axes[1])
fig.tight_layout()
K_prompts = softmax_block.shape[-1]
print(f"head {head}: each token's prompt weights lie between {softmax_block.min().item():.3f} and "
      f"{softmax_block.max().item():.3f} (uniform over K = {K_prompts} prompts would be {1 / K_prompts:.3f})")

# %% [markdown]
# ## Check yourself
#
# **Exercise 1.** Write Eq. 5-8 yourself: given `q, k, v` of shape `(B, H, T, d)`, prompt keys
# and values of shape `(1, H, K, d)` and the effective gate (already through tanh, shape
# `(1, H, 1, 1)`), return $S^g V$ of shape `(B, H, T, d)`. The checker recognises the usual
# mistakes (one softmax instead of two, gate on the wrong part, no causal mask, no scaling).

# %%
def my_zero_init_attention(q, k, v, prompt_k, prompt_v, gate):
    return None  # <- your code here


check_zero_init_attention(my_zero_init_attention)

# %% [markdown]
# **Exercise 2.** How many values does LLaMA-Adapter train on LLaMA-7B with the paper's
# settings: K = 10 prompts in each of the top L = 30 of N = 32 layers, width C = 4096,
# H = 32 heads, one gate per head? Count by hand.

# %%
n_trainable = None  # <- your answer, an integer
check_adapter_param_count(n_trainable)

# %% [markdown]
# **Exercise 3.** Without running anything: at the very first training step, which of these
# get a **non-zero** gradient? Choose from `"prompt"`, `"gate"`, `"wq"`, `"wk"`, `"wv"`, `"wo"`,
# `"embedding"`.

# %%
nonzero_at_step0 = None  # <- a set of names, e.g. {"prompt", "wq"}
check_step0_gradients(nonzero_at_step0)

# %% [markdown]
# Worked solutions: `notebooks/solutions/03_zero_init_attention_solutions.ipynb`.
#
# ## Summary
#
# - Eq. 5-6 score each query against prompts and tokens at once; Eq. 7 uses **two softmaxes**,
#   so the tokens' attention still sums to 1 and the prompts add to it, scaled by the gate.
# - The same math is a **sum**: ordinary causal attention plus `gate * softmax(Q P_k^T/sqrt d) P_v`.
#   The fast form equals the literal one.
# - With the gate at 0 the adapted model's logits are **bit-for-bit** those of the frozen model.
# - At step 0 **only the gate** gets a gradient; the prompts start learning once it opens.
# - Random gates (the ablation) change the output from the start and push random prompts into
#   a pretrained model: notebook 7 measures what that costs.
