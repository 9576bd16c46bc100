"""Alpaca data: exact templates, label masking, truncation, length-grouped batches, bad-input errors."""
import json

import pytest
import torch

from adapterlab.worlds import tinyworld
from adapterlab.data import (
    IGNORE_INDEX,
    DataError,
    BatchSizeError,
    StepSampler,
    TokenDataset,
    check_batch_sizes,
    collate,
    format_prompt,
    get_batch,
    instruction_dataset,
    length_grouped_batches,
    load_alpaca,
    text_windows,
)
from adapterlab.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    world = tinyworld.make_world(0)
    corpus = tinyworld.pretrain_corpus(world, passes=2)
    train, heldout = tinyworld.instruction_set(world)
    return tinyworld.train_tokenizer(corpus, train + heldout, vocab_size=300)


def test_templates_are_the_papers_exact_text():
    assert format_prompt("Say hi.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nSay hi.\n\n### Response:"
    )
    assert format_prompt("Add them.", "2 and 3") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request."
        "\n\n### Instruction:\nAdd them.\n\n### Input:\n2 and 3\n\n### Response:"
    )


def test_labels_mask_the_prompt_and_keep_the_response(tokenizer):
    rec = {"instruction": "Tell me where Ada lives.", "input": "", "output": "Ada lives in Oslo."}
    data = instruction_dataset([rec], tokenizer, max_seq_len=256)
    tokens, labels = data[0]
    prompt = tokenizer.encode(format_prompt(rec["instruction"]), bos=True)
    response = tokenizer.encode(rec["output"], bos=False, eos=True)
    assert tokens == prompt + response
    assert tokens[0] == tokenizer.bos_id and tokens[-1] == tokenizer.eos_id
    assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)  # BOS and prompt: no loss
    assert labels[len(prompt):] == response  # response and EOS: loss
    assert IGNORE_INDEX not in response and 0 not in labels[: len(prompt)]  # ignored label is -100, not token 0
    assert data.n_targets([0]) == len(response)


def test_truncation_is_counted_and_prompt_only_examples_dropped(tokenizer):
    recs = [{"instruction": "Tell me where Ada lives.", "input": "", "output": "Ada lives in Oslo. " * 20},
            {"instruction": "Tell me where Ada lives. " * 30, "input": "", "output": "Oslo."},
            {"instruction": "Hi.", "input": "", "output": "Hello."}]
    data = instruction_dataset(recs, tokenizer, max_seq_len=64)
    assert data.n_truncated == 2 and data.n_dropped == 1 and len(data) == 2
    assert max(data.lengths) == 64
    assert "truncated" in data.summary() and "dropped" in data.summary()


def test_collate_pads_right_with_ignored_labels():
    tokens, labels = collate([([1, 5, 6], [IGNORE_INDEX, 5, 6]), ([1, 7], [IGNORE_INDEX, 7])])
    assert tokens.tolist() == [[1, 5, 6], [1, 7, 0]]
    assert labels.tolist() == [[IGNORE_INDEX, 5, 6], [IGNORE_INDEX, 7, IGNORE_INDEX]]


def test_forward_args_travel_with_their_examples():
    """Per-example model inputs (e.g. image features) are rows of forward_args, batched like the tokens."""
    rows = {"image_features": torch.arange(6.0).view(3, 2), "has_image": torch.tensor([True, False, True])}
    data = TokenDataset([[1, 5], [1, 6, 7], [1, 8]], [[IGNORE_INDEX, 5], [IGNORE_INDEX, 6, 7], [IGNORE_INDEX, 8]],
                        forward_args=rows)
    tokens, labels, forward_args = get_batch(data, [2, 0])
    assert tokens.tolist() == [[1, 8], [1, 5]] and labels.tolist() == [[IGNORE_INDEX, 8], [IGNORE_INDEX, 5]]
    assert forward_args["image_features"].tolist() == [[4.0, 5.0], [0.0, 1.0]]
    assert forward_args["has_image"].tolist() == [True, True]
    assert get_batch(TokenDataset([[1, 2]], [[1, 2]]), [0])[2] == {}  # text: no extra inputs
    with pytest.raises(DataError, match=r"forward_args\['image_features'\] .* \(3 rows\); got \(2, 4\)"):
        TokenDataset([[1]] * 3, [[1]] * 3, forward_args={"image_features": torch.zeros(2, 4)})


def test_one_batch_size_check_for_data_ranks_and_micro_batches():
    assert check_batch_sizes(64, 8, micro_batch=3, n_examples=64) == (8, 3)
    with pytest.raises(BatchSizeError, match="fewer than one global batch of 8"):
        check_batch_sizes(8, n_examples=5)
    with pytest.raises(BatchSizeError, match="fewer than one global batch of 8"):
        length_grouped_batches([3] * 5, 8, seed=0, epoch=0)
    with pytest.raises(BatchSizeError, match="micro-batch size must be >= 1"):
        StepSampler([3] * 16, 8, micro_batch=0)
    assert issubclass(BatchSizeError, DataError)  # the CLI reports both the same way


def test_length_grouped_batches_are_deterministic_full_and_grouped():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 200, (1000,), generator=g).tolist()
    a = length_grouped_batches(lengths, 16, seed=3, epoch=1)
    assert a == length_grouped_batches(lengths, 16, seed=3, epoch=1)
    assert a != length_grouped_batches(lengths, 16, seed=3, epoch=2)  # a new order every epoch
    assert all(len(b) == 16 for b in a) and len(a) == 1000 // 16
    flat = [i for b in a for i in b]
    assert len(set(flat)) == len(flat)  # each example at most once per epoch
    padded = sum(16 * max(lengths[i] for i in b) for b in a)
    g2 = torch.Generator().manual_seed(1)
    random_order = torch.randperm(1000, generator=g2)[: len(flat)].view(-1, 16).tolist()
    padded_random = sum(16 * max(lengths[i] for i in b) for b in random_order)
    assert padded < 0.7 * padded_random  # grouping by length wastes far less on padding


def test_rank_shares_partition_the_global_batch():
    lengths = list(range(10, 110))
    one = StepSampler(lengths, 8, seed=1)
    shares = [StepSampler(lengths, 8, seed=1, rank=r, world_size=4, micro_batch=1) for r in range(4)]
    for step in (0, 5, 13):  # 13 is in the second epoch
        parts = [i for s in shares for mb in s.micro_batches(step) for i in mb]
        assert sorted(parts) == sorted(one.global_batch(step))
        assert all(len(mb) == 1 for mb in shares[0].micro_batches(step))
    with pytest.raises(DataError, match="not divisible"):
        StepSampler(lengths, 6, world_size=4)


def test_text_windows_train_every_token():
    data = text_windows(list(range(100)), 32)
    assert len(data) == 3 and data[1][0] == list(range(32, 64)) and data[1][1] == data[1][0]


# --------------------------------------------------------------------------- bad input
def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, expected", [
    ("", r"empty"),
    ("   \n", r"empty"),
    ('[{"instruction": "a", "output": "b"}', r"not valid JSON .*line 1"),
    ('{"instruction": "a", "output": "b"}', r"expected a JSON list"),
    ("[]", r"list of records is empty"),
    ('[{"instruction": "a", "output": "b"}, {"instruction": "c"}]', r"record 1: missing field 'output'"),
    ('[{"instruction": "a", "input": 3, "output": "b"}]', r"record 0: field 'input' must be a string, found int"),
    ('[{"instruction": "a", "output": "b"}, "oops"]', r"record 1: expected an object"),
])
def test_bad_files_name_the_file_record_and_problem(tmp_path, text, expected):
    path = write(tmp_path, "train.json", text)
    with pytest.raises(DataError, match=expected) as err:
        load_alpaca(path)
    assert str(path) in str(err.value)


def test_every_problem_is_found_before_training(tmp_path):
    recs = [{"instruction": "a", "output": "b"}] * 50 + [{"instruction": 1, "output": "b"}, {"output": "b"}]
    path = write(tmp_path, "train.json", json.dumps(recs))
    with pytest.raises(DataError, match=r"(?s)2 of 52 records are invalid.*record 50.*record 51") as err:
        load_alpaca(path)
    assert "train.json" in str(err.value)


def test_missing_file_and_jsonl(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_alpaca(tmp_path / "nope.json")
    path = write(tmp_path, "train.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": "d"}\n')
    assert [r["instruction"] for r in load_alpaca(path)] == ["a", "c"]
    assert load_alpaca(path)[0]["input"] == ""  # a missing input is an empty one
    bad = write(tmp_path, "bad.jsonl", '{"instruction": "a", "output": "b"}\n{oops\n')
    with pytest.raises(DataError, match="line 2"):
        load_alpaca(bad)
