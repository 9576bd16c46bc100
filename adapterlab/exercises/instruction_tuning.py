"""Checker for notebook 05 (instruction tuning): how many tokens of an Alpaca example count in the loss.

The right count comes from ``data.encode_example`` (the response and EOS; the prompt is labelled -100).
"""
from __future__ import annotations

from ..data import IGNORE_INDEX, encode_example, format_prompt
from .feedback import CheckResult, _ok, _no, _missing, _is_blank, _as_int, _named_mistake


def check_target_token_count(answer, record: dict, tokenizer, max_seq_len: int = 512) -> CheckResult:
    """Exercise: how many tokens of this Alpaca example count in the loss (response tokens + EOS)?"""
    if _is_blank(answer):
        return _missing("an integer")
    n, err = _as_int(answer, "the number of tokens")
    if err is not None:
        return err
    tokens, labels, _ = encode_example(tokenizer, record, max_seq_len)
    expected = sum(1 for x in labels[1:] if x != IGNORE_INDEX)  # position t predicts labels[t + 1]
    response = tokenizer.encode(record["output"], bos=False, eos=False)
    prompt = tokenizer.encode(format_prompt(record["instruction"], record.get("input", "")), bos=True, eos=False)
    if n == expected:
        return _ok(f"the {len(response)} response tokens plus EOS: {expected}. The {len(prompt)} prompt tokens "
                   "(BOS included) are labelled -100 and ignored by the loss.")
    mistakes = [
        (len(response), "counts the response tokens but not EOS: the model must also learn to stop."),
        (len(tokens), "counts every token; the prompt's labels are -100, so only the response is learned."),
        (len(tokens) - 1, "counts every prediction; the prompt positions are masked (-100), only the response counts."),
        (len(prompt), "is the prompt's length: those are exactly the tokens the loss ignores."),
        (len(record["output"].split()), "counts words; the loss counts tokens (tokenizer.encode the output)."),
        (len(record["output"].split()) + 1, "counts words (+ EOS); the loss counts tokens, and a word may be "
                                            "several tokens."),
    ]
    named = _named_mistake(n, expected, mistakes)
    if named is not None:
        return named
    return _no(f"{n} is not it. Encode the example with adapterlab.data.encode_example and count the labels "
               "that are not -100.")
