# %% [markdown]
# # 5. Instruction tuning: worked solution
#
# The "check yourself" exercise of `../05_instruction_tuning.ipynb`.

# %%
from adapterlab import load_llama
from adapterlab.worlds import tinyworld
from adapterlab.data import IGNORE_INDEX, encode_example, format_prompt
from adapterlab.exercises.instruction_tuning import check_target_token_count

tokenizer = load_llama("tinyworld").tokenizer
world, train_records, heldout_records = tinyworld.load_world()
exercise_record = heldout_records[0]

# %% [markdown]
# ## How many tokens count in the loss?
#
# The example is `[BOS] prompt response [EOS]`; the labels are -100 on BOS and the prompt. So
# the loss sees the tokens of the response **and EOS** (the model must learn when to stop).

# %%
# NBVAL_CHECK_OUTPUT
response = tokenizer.encode(exercise_record["output"], bos=False, eos=False)
n_loss_tokens = len(response) + 1  # + EOS
check_target_token_count(n_loss_tokens, exercise_record, tokenizer)

# %% [markdown]
# The same number, read off the labels the training loop uses (position t predicts label t + 1,
# so the first label never counts):

# %%
# NBVAL_CHECK_OUTPUT
tokens, labels, truncated = encode_example(tokenizer, exercise_record, max_seq_len=256)
print("from the labels:", sum(1 for l in labels[1:] if l != IGNORE_INDEX) == n_loss_tokens)
