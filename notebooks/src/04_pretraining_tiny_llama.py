# %% [markdown]
# # 4. Pretraining the tiny LLaMA
#
# **Goal.** LLaMA-Adapter tunes a *pretrained* model: the knowledge is in the frozen
# weights, and the adapter only teaches the model to use it for following instructions. To
# watch that happen on a laptop we need a base model that knows something. Real LLaMA weights
# cannot be downloaded here, and a tiny model pretrained on real web text knows nothing useful,
# so `adapterlab.worlds.tinyworld` makes a small synthetic world and pretrains a small LLaMA on text
# about it. In this notebook we look at the world, its tokenizer, the pretraining loss, and we
# probe what the base knows - including facts about people the instruction data will never
# mention.
#
# **Runtime:** under a minute on 2 CPU cores (47 s measured), most of it a short pretraining run
# done live; the same with an empty cache, since the full base ships with the package.

# %%
import dataclasses
import json
import math

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from adapterlab.worlds import tinyworld
from adapterlab.data import format_prompt
from adapterlab.generate import generate
from adapterlab.model import Llama, LlamaConfig, init_weights
from adapterlab.exercises.pretraining_tiny_llama import check_uniform_loss

torch.manual_seed(0)
plt.rcParams.update({"figure.dpi": 72, "figure.figsize": (7, 3)})

# %% [markdown]
# ## 1. The world
#
# People with a city, a pet, a job, a favourite colour...; cities in countries; small sums.
# Everything is generated from a seed, so everybody gets the same world. Some people are
# **held out**: they appear in the pretraining text, but the instruction set (notebook 5)
# never asks about them.

# %%
recipe = tinyworld.Recipe()
world, corpus, train_records, heldout_records = tinyworld.build_world(recipe)
print("people:", len(world.people), "| held out:", len(world.heldout))
print("attributes:", list(tinyworld.ATTRIBUTES))
print("pretraining documents:", len(corpus))
print("instruction records:", len(train_records), "| held-out questions:", len(heldout_records))
print()
for p in world.people[:6]:
    print(f"{p.name:8s}", " ".join(f"{p.get(a):9s}" for a in tinyworld.ATTRIBUTES), "(held out)" if p.name in world.heldout else "")

# %% [markdown]
# The split is clean: the instruction set never names a held-out person, while the corpus
# talks about everybody.

# %%
# NBVAL_CHECK_OUTPUT
named_in_instructions = {r["name"] for r in train_records if "name" in r}
print("no held-out person in the instruction set:", not (named_in_instructions & set(world.heldout)))
print("every held-out question is about a held-out person:", all(r["name"] in world.heldout for r in heldout_records))
print("every held-out person appears in the pretraining text:", all(any(n in doc for doc in corpus) for n in world.heldout))

# %% [markdown]
# The corpus states each fact many times, in different phrasings, sometimes as a question
# followed by its answer, as real web text does:

# %%
for doc in corpus[:4]:
    print("-", doc)

# %% [markdown]
# ## 2. The tokenizer
#
# A SentencePiece BPE tokenizer trained on the corpus, with LLaMA's special ids (0 = unknown,
# 1 = BOS, 2 = EOS) and LLaMA's habit of splitting numbers into digits.

# %%
# NBVAL_CHECK_OUTPUT
tokenizer = tinyworld.train_tokenizer(corpus, train_records + heldout_records, recipe.vocab_size)
print("vocabulary:", tokenizer.n_words, "| BOS:", tokenizer.bos_id, "| EOS:", tokenizer.eos_id)
ids = tokenizer.encode("What is 12 plus 7?", bos=True)
print("round trip:", tokenizer.decode(ids))

# %%
sentence = f"Where does {world.people[0].name} live? {world.people[0].name} lives in {world.people[0].city}."
ids = tokenizer.encode(sentence, bos=True, eos=True)
print(len(ids), "tokens:", [tokenizer.decode([i]) if i > 2 else ["<unk>", "<s>", "</s>"][i] for i in ids])
stream = tinyworld.corpus_tokens(tokenizer, corpus)
print(f"the corpus is {len(stream):,} tokens")

# %% [markdown]
# ## 3. Where pretraining starts
#
# A freshly initialised model knows nothing: it gives every token about the same probability
# $1/V$. What loss does that give? (You will compute it in the exercise at the end.) Let us
# measure it on a few windows of the corpus.

# %%
config = LlamaConfig(vocab_size=tokenizer.n_words, **recipe.model)
fresh = init_weights(Llama(config), seed=0).eval()
windows = torch.tensor(stream[: 8 * recipe.seq_len]).view(8, recipe.seq_len)  # (8, 128)
with torch.no_grad():
    logits = fresh(windows)
initial_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten()).item()
print(f"loss of the untrained model: {initial_loss:.3f}")

# %%
# NBVAL_CHECK_OUTPUT
print("untrained loss is within 0.1 of the uniform guess:", abs(initial_loss - math.log(tokenizer.n_words)) < 0.1)

# %% [markdown]
# ## 4. Pretraining
#
# Pretraining is next-token prediction on windows of 128 tokens, with the same training loop
# (`adapterlab.train.train`) that later tunes the adapter. A short run of 60 steps, from the
# untrained model above; a callback collects the loss of every step.

# %%
short = dataclasses.replace(recipe, steps=60, warmup_steps=5)
losses = []
_, _, metrics = tinyworld.pretrain(short, progress=True, callbacks=[lambda step, info: losses.append(info["loss"])])
fig, ax = plt.subplots()
ax.plot(range(1, len(losses) + 1), losses)
ax.axhline(math.log(tokenizer.n_words), color="grey", ls="--", label="ln V (knows nothing)")
ax.set_xlabel("step")
ax.set_ylabel("loss")
ax.set_title("The first 60 steps of pretraining")
ax.legend()
print(f"loss {losses[0]:.3f} at step 1 -> {losses[-1]:.3f} at step {len(losses)} (ln V = {math.log(tokenizer.n_words):.3f})")

# %%
# NBVAL_CHECK_OUTPUT
print("the loss fell over the 60 steps, by more than 1 nat:", losses[-1] < losses[0] - 1.0)

# %% [markdown]
# The full recipe runs `recipe.steps` steps (printed below, with the time its build took). The
# package ships the result, built by this same code with one thread, so every machine starts from
# the same weights; with a changed recipe it is built once, on first use, into a cache folder.
# Either way, that is what `load_llama("tinyworld")` and `tinyworld.load_base()` return. The
# folder is a Meta-style LLaMA folder (`params.json`, the weights as
# `consolidated.00.safetensors` or `.pth`, `tokenizer.model`), so real weights load with the same call.

# %%
base = tinyworld.load_base()
folder = tinyworld.base_dir()
info = json.loads((folder / "tinyworld.json").read_text())
print("folder:", folder)
print(sorted(p.name for p in folder.iterdir()))
print(f"the full recipe: {info['recipe']['steps']} steps of {info['recipe']['batch_size']} windows of "
      f"{info['recipe']['seq_len']} tokens; its build took {info['pretrain_seconds'] / 60:.1f} minutes")

# %%
print(base.config)
print(f"parameters: {base.num_params():,}")

# %%
# NBVAL_CHECK_OUTPUT
print("the same Llama class as LLaMA-7B:", type(base).__name__)
print("frozen (no parameter requires grad):", not any(p.requires_grad for p in base.parameters()))
print("its tokenizer is attached:", base.tokenizer.n_words == base.config.vocab_size)

# %%
steps, loss_values = zip(*info["loss_history"])
fig, ax = plt.subplots()
ax.plot(steps, loss_values, marker=".")
ax.axhline(math.log(tokenizer.n_words), color="grey", ls="--", label="ln V")
ax.set_xlabel("step")
ax.set_ylabel("loss")
ax.set_title(f"Pretraining the base: final loss {info['final_loss']:.2f}")
ax.legend();

# %% [markdown]
# ## 5. What does the base know?
#
# A pretrained model is a text continuer. Give it the start of a fact and let it go on:

# %%
tokenizer = base.tokenizer
people = {p.name: p for p in world.people}
held = world.heldout[:3]
for name, text in zip(held, generate(base, tokenizer, [f"{n} lives in" for n in held], max_new_tokens=6, greedy=True)):
    print(f"{name} lives in ...{text!r}   (true: {people[name].city})")

# %% [markdown]
# To measure knowledge without generating, we **probe**: for every fact, score each possible
# value by the log-probability the model gives to the whole sentence, and see if the true
# value wins. The sentences are the answers of the instruction set (`tinyworld.ANSWERS`).
# `tinyworld.sentence_logprobs` sums log p(token | earlier tokens) over each sentence;
# `tinyworld.probe_base` compares those sums across the 8 values of each attribute (both are
# short: read them in `adapterlab/worlds/tinyworld.py`).

# %%
known_train = tinyworld.probe_base(base, tokenizer, world.train_people)
known_heldout = tinyworld.probe_base(base, tokenizer, world.heldout_people)
print("people in the instruction set:", {a: round(v, 2) for a, v in known_train.items()})
print("held-out people:              ", {a: round(v, 2) for a, v in known_heldout.items()})

# %%
fig, ax = plt.subplots()
x = torch.arange(len(known_train))
ax.bar(x - 0.2, list(known_train.values()), 0.4, label="people asked about in the instruction set")
ax.bar(x + 0.2, list(known_heldout.values()), 0.4, label="held-out people")
ax.axhline(1 / 8, color="grey", ls="--", label="chance (1 of 8)")
ax.set_xticks(x, list(known_train))
ax.set_ylabel("fact probe accuracy")
ax.set_ylim(0, 1.05)
mean_train = sum(known_train.values()) / len(known_train)
mean_heldout = sum(known_heldout.values()) / len(known_heldout)
ax.set_title(f"Fact probe: mean {mean_train:.2f} (instruction-set people), {mean_heldout:.2f} (held out)")
ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1));

# %%
# NBVAL_CHECK_OUTPUT
print("the base knows held-out facts far above chance (mean probe accuracy > 0.5, chance 1/8):", mean_heldout > 0.5)

# %% [markdown]
# ## 6. ...but it does not answer questions
#
# Knowing is not answering. Wrapped in the Alpaca instruction template, a question is text
# the base has never seen, and it continues it as best it can:

# %%
for r in heldout_records[:3]:
    prompt = format_prompt(r["instruction"], r["input"])
    answer = generate(base, tokenizer, [prompt], max_new_tokens=16, greedy=True)[0]
    print(f"Q: {r['instruction']} {r['input']}\n   base says: {answer!r}   (expected: {r['answer']})")

# %%
before = tinyworld.heldout_accuracy(base, tokenizer, heldout_records)
print(f"held-out question accuracy of the base, before any instruction tuning: {before:.2f}")

# %%
# NBVAL_CHECK_OUTPUT
print("the base knows more than it can answer (probe accuracy > question accuracy):", mean_heldout > before)

# %% [markdown]
# Notebook 5 attaches an adapter and teaches the frozen base the instruction format using
# questions about the *other* people only, then asks it about the held-out ones.
#
# ## Check yourself
#
# **Exercise.** A model that gives each of the V tokens probability 1/V: what is its
# cross-entropy loss, in the units PyTorch uses? (Section 3 measured it; compute it from V.)

# %%
uniform_loss = None  # <- your answer, a number
check_uniform_loss(uniform_loss, vocab_size=tokenizer.n_words)

# %% [markdown]
# Worked solution: `notebooks/solutions/04_pretraining_tiny_llama_solutions.ipynb`.
#
# ## Summary
#
# - The tiny world: people, places and sums, generated from a seed; part of the people are held out.
# - A SentencePiece tokenizer with LLaMA's special ids; a small LLaMA (same code as the 7B one)
#   pretrained on the world's text, starting from the uniform loss ln V.
# - The base ships with the package as a Meta-style folder (built once and cached if the recipe changes).
# - Probing shows the base **knows** the facts, held-out people included, but it does **not
#   answer** instruction-formatted questions. Closing that gap is the adapter's job.
