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
# pretrained on text about a small synthetic world). The same calls work on real LLaMA weights
# (notebook 10).
#
# **Runtime:** about 2 minutes on 2 CPU cores with one torch thread, most of it the training
# cell; the same with an empty cache, since the tiny base ships with the package (measured
# 2026-12-07; `notebooks/README.md` has every notebook's times).

# %%
import matplotlib.pyplot as plt
import torch

from adapterlab import add_adapter, gate_values, load_llama
from adapterlab import recipes
from adapterlab.worlds import tinyworld
from adapterlab.adapter import count_trainable
from adapterlab.data import format_prompt, instruction_dataset
from adapterlab.io.files import build_machine, default_threads
from adapterlab.gates import LivePlot, explorer
from adapterlab.generate import generate
from adapterlab.train import train
from adapterlab.exercises.zero_init_attention import check_step0_gradients

torch.manual_seed(0)
torch.set_num_threads(default_threads())  # $ADAPTERLAB_THREADS, else 1: the thread policy of `adapterlab demo`
plt.rcParams.update({"figure.dpi": 72})
machine = build_machine()  # what decides the rounding: torch's version and the CPU's vector unit
print(f"torch {machine['torch']} with {torch.get_num_threads()} thread(s) on a CPU whose vector unit is {machine['cpu']}")

# %% [markdown]
# ## 1. A frozen base that knows things
#
# The tiny world has a few dozen people, each with a city, a pet, a job, a favourite colour...
# The base model read text about all of them during pretraining. Let it complete a sentence
# about each of a few people:

# %%
model = load_llama("tinyworld")  # the frozen tiny base with its tokenizer
tokenizer = model.tokenizer
world, train_records, heldout_records = tinyworld.load_world()
people = world.heldout_people[:5]
completions = generate(model, tokenizer, [f"{p.name} lives in" for p in people], max_new_tokens=4, greedy=True)
for p, text in zip(people, completions):
    print(f"{p.name} lives in ...{text}   (true: {p.city})")
known = sum(p.city in text for p, text in zip(people, completions))
print(f"\nThe base completes {known} of these {len(people)} facts correctly.")

# %% [markdown]
# ...but it is a text continuer, not an assistant. Ask it questions in the Alpaca instruction
# format and see what it writes. A few of the held-out questions it gets wrong, and its accuracy
# on all of them:

# %%
rows = tinyworld.evaluate(model, tokenizer, heldout_records)
accuracy_before = sum(r["correct"] for r in rows) / len(rows)
wrong = [(record, row) for record, row in zip(heldout_records, rows) if not row["correct"]]
for record, row in wrong[:3]:
    print(f"{row['question']}\n   base: {row['answer']!r}   (expected: {row['expected']})")
print(f"\nheld-out accuracy of the base: {accuracy_before:.2f} ({len(rows) - len(wrong)} of {len(rows)} questions)")
example = wrong[0][0]
prompt = format_prompt(example["instruction"], example["input"])
print("\nThe model reads this prompt:\n" + prompt)

# %% [markdown]
# ## 2. Attach an adapter
#
# `add_adapter` freezes the base and gives each adapted layer K learnable prompt vectors
# and one gate per attention head, **initialised to 0**. Every word token can attend to the
# prompts, but their contribution is multiplied by tanh(gate) = 0, so the model is exactly
# unchanged at the start. We take the tiny world's settings from `recipes.TINY_WORLD`, the one
# table `adapterlab demo` and `adapterlab finetune` read too (K = 10 prompts in each of the 4 layers):

# %%
# NBVAL_CHECK_OUTPUT
tokens = torch.tensor([tokenizer.encode(prompt)])
with torch.no_grad():
    logits_before = model(tokens)
adapter_config = recipes.adapter_config(model.config.n_layers)  # the tiny world's defaults
add_adapter(model, adapter_config, seed=0)
with torch.no_grad():
    logits_after = model(tokens)
print(f"K = {adapter_config.prompt_len} prompts in L = {adapter_config.layers} layers")
print("trainable: under 1% of the parameters:", count_trainable(model) < 0.01 * model.num_params())
print("gates at start:", gate_values(model).abs().max().item())
print("output identical after attaching the adapter:", torch.equal(logits_before, logits_after))

# %% [markdown]
# ## 3. Train only the adapter and watch the gates open
#
# The instruction set asks about most of the people; the others are **held out**. The
# training settings are `adapterlab demo`'s too (`recipes.train_config()`: `recipes.TINY_WORLD`'s
# steps, batch and learning rate), with the same seed, so this run *is* the demo's run: same
# gates, same accuracy on the same kind of CPU with the same thread count. Another vector unit
# (the first cell printed yours) rounds differently, and then training ends elsewhere: with seed 0
# and one thread the held-out accuracy is 0.85 on an AVX2 CPU and 0.73 on an AVX-512 one, and over
# seeds 0-4 it ranges 0.73-0.93 (`docs/bases.md`). The picture below redraws every 10 steps.

# %%
data = instruction_dataset(train_records, tokenizer, max_seq_len=recipes.TINY_WORLD.max_seq_len)
config = recipes.train_config(checkpoint=False, seed=0)  # TINY_WORLD: steps, batch, lr, warm-up
print(f"{config.steps} steps of {config.batch_size} examples, peak learning rate {config.lr}, "
      f"{config.warmup_steps} warm-up steps")

live = LivePlot(every=10)
metrics = train(model, data, config, callbacks=[live])
print(f"trained in {metrics['train_seconds']:.0f} s with {torch.get_num_threads()} torch thread(s)")

# %% [markdown]
# ## 4. Before and after
#
# Questions about held-out people: the adapter never saw them, so correct answers come from
# knowledge the frozen base already had.

# %%
model.eval()
rows_after = tinyworld.evaluate(model, tokenizer, heldout_records)
accuracy_after = sum(r["correct"] for r in rows_after) / len(rows_after)
right_after = sum(r["correct"] for r in rows_after)
print(f"held-out accuracy: before {accuracy_before:.2f}  ->  after {accuracy_after:.2f}: the adapter now answers "
      f"{right_after} of {len(rows_after)} questions about people its training data never mentioned.\n")
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
