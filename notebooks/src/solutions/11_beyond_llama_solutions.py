# %% [markdown]
# # 11. Zero-init attention beyond LLaMA: worked solution
#
# The "check yourself" exercise of `../11_beyond_llama.ipynb`. Try it there first: the checker
# tells you which mistake it sees.

# %%
from collections import Counter

from adapterlab.metrics import squad
from adapterlab.exercises.beyond_llama import check_squad_f1

# %% [markdown]
# ## The SQuAD F1 of one prediction, by hand
#
# Prediction `"the old red boat, the red one"`; references `"The old boat in the harbour"` and
# `"a red boat"`.
#
# 1. **Normalise** both sides: lower case, drop punctuation, drop the articles a/an/the, single
#    spaces. The prediction becomes `old red boat red one` (5 words); the references
#    `old boat in harbour` (4 words) and `red boat` (2 words).
# 2. **Shared words, as a bag**: a word counts min(times in the prediction, times in the
#    reference) times. Against `old boat in harbour`: *old*, *boat* = 2. Against `red boat`:
#    *red* once (the reference has it once, even though the prediction says it twice), *boat* = 2.
# 3. **Precision** = shared / predicted words, **recall** = shared / reference words,
#    **F1** = 2PR / (P + R):
#    - first reference: P = 2/5, R = 2/4, F1 = 2 (0.4)(0.5) / 0.9 = 4/9 = 0.444;
#    - second reference: P = 2/5, R = 2/2, F1 = 2 (0.4)(1) / 1.4 = 4/7 = 0.571.
# 4. **Best over the references**: 4/7 = 0.571. (EM is 0: neither reference matches exactly.)

# %%
# NBVAL_CHECK_OUTPUT
def words(text: str) -> list[str]:
    return squad.normalize_answer(text).split()


prediction = "the old red boat, the red one"
references = ["The old boat in the harbour", "a red boat"]
scores = []
for ref in references:
    shared = sum((Counter(words(prediction)) & Counter(words(ref))).values())  # a bag: min of the two counts
    p, r = shared / len(words(prediction)), shared / len(words(ref))
    scores.append(2 * p * r / (p + r))
    print(f"{' '.join(words(ref))!r:24s} shared {shared}  P {p:.3f}  R {r:.3f}  F1 {scores[-1]:.3f}")
f1 = max(scores)
print(check_squad_f1(f1))
print("the library agrees:", squad.score_question(prediction, references) == (0.0, f1))

# %% [markdown]
# ## And a v2.0 question without an answer
#
# With no reference answer, F1 (and EM) is 1 exactly when the prediction is empty after
# normalisation, 0 otherwise: "The." normalises to nothing, so it counts as "no answer".

# %%
# NBVAL_CHECK_OUTPUT
for prediction in ("", "The.", "in Oslo"):
    right = float(not words(prediction))
    print(f"{prediction!r:10s} F1 {right:.0f}:", check_squad_f1(right, prediction=prediction, references=[]))
