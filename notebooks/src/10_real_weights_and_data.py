# %% [markdown]
# # 10. Real LLaMA weights and real Alpaca data
#
# **Goal.** Use the same API on the files you meet in the wild: a LLaMA folder from Meta or
# from Hugging Face, an Alpaca JSON file, and adapters released by the authors or trained with
# PEFT. Nothing here is specific to the tiny world.
#
# **Your own files.** Point environment variables at them before starting Jupyter:
#
# ```bash
# export ADAPTERLAB_LLAMA_DIR=/models/llama/7B          # Meta (params.json + consolidated.*.pth) or HF (config.json + *.safetensors)
# export ADAPTERLAB_ALPACA_JSON=/data/alpaca_data.json  # a JSON list of {"instruction", "input", "output"}
# ```
#
# Without them (as in CI) every cell runs on **stand-ins written in the same formats**: the
# tiny base, which is stored as a Meta folder; a Hugging Face folder written by `transformers`;
# an Alpaca file written from the tiny world's instruction set. A 7B model needs a GPU (or
# about 30 GB of RAM in fp32); the training cell then runs a few steps only, as a smoke test.
#
# **Runtime** on the stand-ins: under half a minute on 2 CPU cores (10 s measured), with or
# without a cache (the tiny base ships with the package).

# %%
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from adapterlab import AdapterConfig, add_adapter, load_adapter, load_llama, save_adapter
from adapterlab.worlds import tinyworld
from adapterlab.adapter import adapted_layers, gate_values, remove_adapter
from adapterlab.data import DataError, format_prompt, instruction_dataset, load_alpaca, save_alpaca
from adapterlab.generate import generate
from adapterlab.train import TrainConfig, train
from adapterlab.exercises.real_weights_and_data import check_hf_to_meta_rows

torch.manual_seed(0)
work = Path(tempfile.mkdtemp(prefix="adapterlab-real-"))
LLAMA_DIR = os.environ.get("ADAPTERLAB_LLAMA_DIR")
ALPACA_JSON = os.environ.get("ADAPTERLAB_ALPACA_JSON")
print("LLaMA folder:", LLAMA_DIR or "(stand-in: the tiny base, a Meta-format folder)")
print("Alpaca file: ", ALPACA_JSON or "(stand-in: the tiny world's instruction set)")

# %% [markdown]
# ## 1. A Meta LLaMA folder
#
# Meta's release: `params.json` (the shape), `consolidated.00.pth` ... (one shard per GPU of the
# original model-parallel run: 1 for 7B, 2 for 13B, 4 for 33B, 8 for 65B) and `tokenizer.model`
# (SentencePiece; for Meta's downloads often one folder up). `load_llama` merges the shards,
# checks every tensor's shape against `params.json`, and loads pickles with `weights_only=True`
# (a checkpoint is untrusted input: no code in it runs). The stand-in keeps its weights as
# `consolidated.00.safetensors` instead of a pickle; `load_llama` reads either.

# %%
meta_dir = Path(LLAMA_DIR) if LLAMA_DIR else tinyworld.build_base()  # the stand-in's folder (shipped or cached)
for f in sorted(meta_dir.iterdir()):
    print(f"{f.name:24s} {f.stat().st_size / 1e6:10.2f} MB")
if (meta_dir / "params.json").is_file():
    print(json.loads((meta_dir / "params.json").read_text()))

# %%
model = load_llama(meta_dir)  # CUDA if available; dtype as stored
tokenizer = model.tokenizer
print(model.config)
print(f"{model.num_params():,} parameters on {model.device}, dtype {model.tok_embeddings.weight.dtype}")

# %%
# NBVAL_CHECK_OUTPUT
print("loaded a Llama with its tokenizer:", type(model).__name__, type(tokenizer).__name__)
print("vocabulary of the tokenizer == the model's:", tokenizer.n_words == model.config.vocab_size)

# %% [markdown]
# ## 2. A Hugging Face folder
#
# `config.json` plus `model.safetensors` (or shards with `model.safetensors.index.json`).
# Hugging Face renames every tensor and permutes the rows of `q_proj`/`k_proj`: its rotary code
# rotates the two *halves* of a head, Meta's rotates interleaved *pairs* (exercise below).
# `load_llama` recognises the folder and converts both. The stand-in is a small random
# `LlamaForCausalLM` saved by `transformers` itself.

# %%
try:
    import transformers
except ImportError:
    transformers = None
    print("transformers is not installed: skipping the Hugging Face part (pip install transformers)")

if transformers is not None:
    transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bar
    hf_dir = work / "hf-llama"
    hf_config = transformers.LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=tokenizer.n_words,
                                         max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():  # O(1) weights, so a wrong conversion could not hide in tiny logits
        for p in hf_model.parameters():
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5 if p.dim() == 2 else 1 + 0.1 * torch.randn_like(p))
    hf_model.save_pretrained(hf_dir)
    tokenizer.save(hf_dir / "tokenizer.model")  # HF folders of LLaMA ship the SentencePiece file too
    print(sorted(p.name for p in hf_dir.iterdir()))

    ours = load_llama(hf_dir, device="cpu", dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode("Where does Ada live?")])
    with torch.no_grad():
        diff = (ours(ids) - hf_model(ids).logits).abs().max().item()
    print(f"largest logit difference, ours vs transformers: {diff:.1e}")
    assert diff < 1e-4

# %% [markdown]
# ## 3. An Alpaca JSON file
#
# A list of records `{"instruction", "input", "output"}` (about 40% of Alpaca-52K have an
# input). `load_alpaca` validates *every* record before anything trains, and its errors name
# the file, the record and the field:

# %%
if ALPACA_JSON:
    alpaca_path = Path(ALPACA_JSON)
else:
    _, train_records, _ = tinyworld.load_world()
    alpaca_path = work / "alpaca_standin.json"
    save_alpaca([{k: r[k] for k in ("instruction", "input", "output")} for r in train_records], alpaca_path)
records = load_alpaca(alpaca_path)
with_input = sum(bool(r.get("input")) for r in records)
print(f"{len(records):,} records from {alpaca_path.name}; {100 * with_input / len(records):.0f}% with an input")
print(json.dumps(records[0], indent=1))

# %%
broken = work / "broken.json"
broken.write_text(json.dumps([records[0], {"instruction": "Say hi.", "input": ""}, {"instruction": 3, "output": "x"}]))
try:
    load_alpaca(broken)
except DataError as e:
    message = str(e)
    print(message)

# %%
# NBVAL_CHECK_OUTPUT
print("the error names the file:", "broken.json" in message)
print("...and the field that is missing:", "output" in message)

# %% [markdown]
# ## 4. Train an adapter on them
#
# The release's recipe for 7B is `AdapterConfig(prompt_len=10, layers=30)` and 5 epochs on
# 8 GPUs (notebook 8 has the command). Here: a few steps, to show the API is the same. On the
# stand-ins this is the tiny base; with your folder, the first steps of the real thing.

# %%
L = min(30, model.config.n_layers)
add_adapter(model, AdapterConfig(prompt_len=10, layers=L), seed=0)
data = instruction_dataset(records, tokenizer, max_seq_len=min(512, model.config.max_seq_len), source=alpaca_path.name)
print(data.summary())
config = TrainConfig(steps=20, batch_size=8, micro_batch_size=1 if LLAMA_DIR else None,  # 1: a 7B model fits one GPU
                     lr=2e-2, warmup_steps=2, checkpoint=False, seed=0)
metrics = train(model, data, config)
print("loss every 10 steps:", [round(loss, 3) for _, loss in metrics["loss_history"]])
print(f"gates now up to {gate_values(model).abs().max().item():.3f}")

# %% [markdown]
# ## 5. Adapters from elsewhere
#
# `load_adapter` reads three formats and checks every shape against the model first:
#
# - ours: a folder written by `save_adapter` (`adapter.safetensors` + `adapter_config.json`);
# - the **official release** (`llama_adapter_len10_layer30_release.pth`): a torch pickle with
#   `adapter_query.weight` of shape (K*L, C), rows grouped layer by layer from the bottom adapted
#   layer, and `layers.{i}.attention.gate` (1, H, 1, 1);
# - a **PEFT** "adaption prompt" folder (one gate per layer, no tanh).
#
# We write our adapter in the official layout by hand, to see what that file holds, and load it
# into a fresh base.

# %%
ours_dir = save_adapter(model, work / "our-adapter")
official = {"adapter_query.weight": torch.cat([model.layers[i].attention.adapter.prompt for i in adapted_layers(model)])}
for i in adapted_layers(model):
    official[f"layers.{i}.attention.gate"] = model.layers[i].attention.adapter.gate.detach().reshape(1, -1, 1, 1)
official_path = work / "official_format.pth"
torch.save({k: v.detach().cpu() for k, v in official.items()}, official_path)
print({k: tuple(v.shape) for k, v in list(official.items())[:3]}, "...")

prompt = format_prompt(records[0]["instruction"], records[0].get("input", ""))
ids = torch.tensor([tokenizer.encode(prompt)], device=model.device)
model.eval()
with torch.no_grad():
    reference = model(ids)
print("trained model:", generate(model, tokenizer, [prompt], max_new_tokens=12, greedy=True)[0])

fresh = load_llama(meta_dir, device=model.device).eval()  # one more copy of the base; each format in turn
with torch.no_grad():
    load_adapter(fresh, ours_dir)
    same_ours = torch.allclose(fresh(ids), reference, atol=1e-5)
    remove_adapter(fresh)
    load_adapter(fresh, official_path, prompt_len=10)
    same_official = torch.allclose(fresh(ids), reference, atol=1e-5)
print("official layout:", generate(fresh, tokenizer, [prompt], max_new_tokens=12, greedy=True)[0])

# %%
# NBVAL_CHECK_OUTPUT
print("our format reproduces the trained model:", same_ours)
print("the official layout reproduces it too:", same_official)

# %% [markdown]
# ## Check yourself
#
# **Exercise.** Write the row permutation that turns a Hugging Face `q_proj` or `k_proj`
# weight `(n_heads * d, C)` into Meta's `wq` / `wk`. Inside each head of d rows, Meta keeps
# the two halves of rotary pair i next to each other (rows 2i and 2i + 1); Hugging Face keeps
# them d/2 rows apart (rows i and d/2 + i). So Meta's row 2i + c is HF's row c*d/2 + i.

# %%
def my_hf_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    return None  # <- your code here


check_hf_to_meta_rows(my_hf_to_meta)

# %% [markdown]
# Worked solution: `notebooks/solutions/10_real_weights_and_data_solutions.ipynb`.
#
# ## Summary
#
# - `load_llama(folder)` reads Meta folders (merging model-parallel shards) and Hugging Face
#   folders (renaming and un-permuting q/k), with untrusted-safe loading; the result is the
#   same `Llama` as the tiny one, with its tokenizer.
# - `load_alpaca` validates every record first and says exactly what is wrong where.
# - The adapter, the training loop and generation are the same calls as on the tiny world.
# - `load_adapter` reads our format, the official release and PEFT folders.
#
# To use your own files, set `ADAPTERLAB_LLAMA_DIR` / `ADAPTERLAB_ALPACA_JSON` and run again.

# %%
shutil.rmtree(work, ignore_errors=True)
