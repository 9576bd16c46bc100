# %% [markdown]
# # 1. Quick tour: LLaMA-Adapter in a few minutes
#
# **Goal.** See the whole story of LLaMA-Adapter (Zhang et al., 2023, arXiv 2303.16199) run
# on your laptop:
#
# 1. a **frozen** pretrained LLaMA that knows facts but does not follow instructions;
# 2. an **adapter**: a few learnable prompt vectors in each layer, joined to the attention
#    through a **gate that starts at zero**, so at first nothing changes;
# 3. training only the adapter: the **gates open** and the model learns to answer;
# 4. answers **before and after**, about people the training data never mentioned.
#
# Everything runs on the embedded tiny world (`load_llama("tinyworld")`: a 4-layer LLaMA
# pretrained on text about a small synthetic world, built once and cached). The same calls work
# on real LLaMA weights (notebook 10).

# %%
import matplotlib.pyplot as plt
import torch

from adapterlab import AdapterConfig, add_adapter, gate_values, load_llama
from adapterlab import tinyworld
from adapterlab.adapter import count_trainable
from adapterlab.data import instruction_dataset
from adapterlab.gates import LivePlot, explorer
from adapterlab.generate import generate
from adapterlab.data import format_prompt
from adapterlab.train import TrainConfig, train
from adapterlab.exercises import check_step0_gradients

torch.manual_seed(0)
plt.rcParams.update({"figure.dpi": 72})

# %% [markdown]
# ## 1. A frozen base that knows things
#
# The tiny world has a few dozen people, each with a city, a pet, a job, a favourite colour...
# The base model read text about all of them during pretraining. It completes facts:

# %%
model = load_llama("tinyworld")  # builds the tiny base on first use (about 2 minutes), then cached
tokenizer = model.tokenizer
world, train_records, heldout_records = tinyworld.load_world()
someone = world.heldout_people[0]
print(f"{someone.name} lives in ...", generate(model, tokenizer, [f"{someone.name} lives in"], max_new_tokens=4, greedy=True)[0])
print("(true:", someone.city + ")")

# %% [markdown]
# ...but it is a text continuer, not an assistant. Ask it questions in the Alpaca instruction
# format and it just goes on writing: it may state a fact, often not the one asked for, and it
# does not stop. Here are the held-out questions it gets wrong:

# %%
rows = tinyworld.evaluate(model, tokenizer, heldout_records)
accuracy_before = sum(r["correct"] for r in rows) / len(rows)
wrong = [(record, row) for record, row in zip(heldout_records, rows) if not row["correct"]]
for record, row in wrong[:3]:
    print(f"{row['question']}\n   base: {row['answer']!r}   (expected: {row['expected']})")
print(f"\nheld-out accuracy of the base: {accuracy_before:.2f}")
example = wrong[0][0]
prompt = format_prompt(example["instruction"], example["input"])
print("\nThe model reads this prompt:\n" + prompt)

# %% [markdown]
# ## 2. Attach an adapter
#
# `add_adapter` freezes the base and gives each adapted layer K = 10 learnable prompt vectors
# and one gate per attention head, **initialised to 0**. Every word token can attend to the
# prompts, but their contribution is multiplied by tanh(gate) = 0, so the model is exactly
# unchanged at the start:

# %%
# NBVAL_CHECK_OUTPUT
tokens = torch.tensor([tokenizer.encode(prompt)])
with torch.no_grad():
    logits_before = model(tokens)
add_adapter(model, AdapterConfig(prompt_len=10, layers=4), seed=0)
with torch.no_grad():
    logits_after = model(tokens)
print("trainable: under 1% of the parameters:", count_trainable(model) < 0.01 * model.num_params())
print("gates at start:", gate_values(model).abs().max().item())
print("output identical after attaching the adapter:", torch.equal(logits_before, logits_after))

# %% [markdown]
# ## 3. Train only the adapter and watch the gates open
#
# The instruction set asks about most of the people; the others are **held out**. About a
# minute on two CPU cores. The picture below redraws every 10 steps.

# %%
data = instruction_dataset(train_records, tokenizer, max_seq_len=256)

live = LivePlot(every=10)
config = TrainConfig(steps=200, batch_size=32, lr=2e-2, warmup_steps=10, log_every=10, checkpoint=False, seed=0)
metrics = train(model, data, config, callbacks=[live])

# %% [markdown]
# ## 4. Before and after
#
# Questions about held-out people: the adapter never saw them, so correct answers come from
# knowledge the frozen base already had.

# %%
model.eval()
rows_after = tinyworld.evaluate(model, tokenizer, heldout_records)
accuracy_after = sum(r["correct"] for r in rows_after) / len(rows_after)
print(f"held-out accuracy: before {accuracy_before:.2f}  ->  after {accuracy_after:.2f}\n")
for before, after in list(zip(rows, rows_after))[:5]:
    print(f"{after['question']}\n   before: {before['answer']!r}\n   after:  {after['answer']!r}"
          f"   {'right' if after['correct'] else 'wrong'} (expected: {after['expected']})")

# %%
# NBVAL_CHECK_OUTPUT
print("held-out accuracy improved:", accuracy_after > accuracy_before)
print("every gate moved away from 0:", bool((gate_values(model) != 0).all()))

# %%
fig, ax = plt.subplots(figsize=(4, 3))
ax.bar(["before", "after"], [accuracy_before, accuracy_after], color=["grey", "tab:blue"])
ax.set_ylim(0, 1)
ax.set_ylabel("held-out accuracy")
ax.set_title(f"Frozen base + {count_trainable(model):,} trained numbers");

# %% [markdown]
# ## 5. Explore the gates
#
# Drag the slider through training; pick a layer and heads. Which layer opened its gates most?
# Do some heads go negative (the prompts then *subtract* from the attention output)?

# %%
explorer(live.records)

# %% [markdown]
# ## Check yourself
#
# At the very first training step, which tensors get a non-zero gradient? Choose from
# `"prompt"`, `"gate"`, `"wq"`, `"wk"`, `"wv"`, `"wo"`, `"embedding"`. (Notebook 3 shows why.)

# %%
nonzero_at_step0 = None  # <- a set of names, e.g. {"prompt", "wq"}
check_step0_gradients(nonzero_at_step0)

# %% [markdown]
# Worked solution: `notebooks/solutions/01_quick_tour_solutions.ipynb`.
#
# ## Summary
#
# - The base is frozen; only prompts and gates train (a fraction of a percent of the weights).
# - Zero-init gates: attaching the adapter changes nothing; training opens the gates.
# - The adapter turns a text continuer into a question answerer, also for facts it was never
#   tuned on.
#
# Next: notebook 2 (LLaMA's blocks) and notebook 3 (the zero-init attention step by step).
