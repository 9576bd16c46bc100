"""Tokenizers: one interface, two implementations, one loader.

The core (beside model): sentencepiece, tokenizers and jinja2 only, nothing from adapterlab.

    tok = load_tokenizer(path)        # tokenizer.model, tokenizer.json, a folder holding either, or a .gguf file
    tok = Tokenizer.from_gguf(fields) # a GGUF file's metadata as a dict: name -> value
    ids = tok.encode(text, bos=True, eos=False); text = tok.decode(ids)
    ids = tok.chat([{"role": "user", "content": "Hi"}])   # the model's own chat template

- :class:`SentencePieceTokenizer`: Meta LLaMA's ``tokenizer.model``, and the tokenizers we train for the
  tiny worlds (ids 0 = <unk>, 1 = <s>, 2 = </s>, no pad: pad_id = -1). ``Tokenizer(path)`` opens one.
- :class:`BPETokenizer`: byte-level BPE through Hugging Face's ``tokenizers`` (SmolLM2, Llama 3, TinyLlama's
  tokenizer.json), from a ``tokenizer.json`` folder or rebuilt from a GGUF file's metadata.

``bos=True`` starts a sequence the way the model's own tokenizer does: LLaMA puts <s> first, SmolLM2 puts
nothing (its files say add_bos_token false), so ``encode(text, bos=True)`` equals transformers'
``tokenizer(text).input_ids``. ``eos=True`` always appends ``eos_id`` (the token that ends a turn).
"""
from __future__ import annotations

import io
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import sentencepiece as spm

PathLike = str | os.PathLike


class Tokenizer:
    """What the rest of the package uses: encode, decode, the special ids, the vocabulary size, chat.

    Attributes every implementation sets: n_words (= vocab_size), bos_id, eos_id, unk_id, pad_id
    (-1 when the model has none), add_bos (whether ``bos=True`` puts bos_id first), chat_template
    (a Jinja string or None), source (where it came from, for error messages).
    """

    n_words: int
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int
    add_bos: bool
    chat_template: Optional[str]
    source: str

    def __new__(cls, *args, **kwargs):
        # Tokenizer(path) / Tokenizer(model_proto=...) keep opening a SentencePiece model, as they always did.
        if cls is Tokenizer:
            return super().__new__(SentencePieceTokenizer)
        return super().__new__(cls)

    @property
    def vocab_size(self) -> int:
        return self.n_words

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        raise NotImplementedError

    def files(self) -> dict[str, bytes]:
        """The files that :func:`load_tokenizer` reads back from a folder: name -> bytes."""
        raise NotImplementedError

    def save(self, path: PathLike) -> None:
        """Write :meth:`files` into the folder ``path`` (created if needed). A SentencePiece tokenizer also
        accepts a file path ending in ``.model``: the model bytes alone go there."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in self.files().items():
            (folder / name).write_bytes(data)

    def chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, tokenize: bool = True,
             template: Optional[str] = None, **variables: Any) -> list[int] | str:
        """Render ``messages`` ([{"role": "system"|"user"|"assistant", "content": str}, ...]) with the model's
        own chat template -> token ids (``tokenize=True``) or the text.

        add_generation_prompt: end with the header of the assistant's turn, so the model writes the answer.
        template: a Jinja template to use instead of the model's (a model without one needs it). Extra
        keyword arguments reach the template as variables. The same text and ids as transformers'
        ``apply_chat_template``: special tokens written by the template (<|im_start|>) become their ids.
        """
        template = template if template is not None else self.chat_template
        if template is None:
            raise ValueError(
                f"the tokenizer from {self.source} carries no chat template; pass one: "
                f"tokenizer.chat(messages, template='{{% for m in messages %}}...'), or load a tokenizer whose "
                f"files have one (tokenizer_config.json 'chat_template', chat_template.jinja, a GGUF's tokenizer.chat_template)"
            )
        text = render_chat_template(template, messages, add_generation_prompt=add_generation_prompt,
                                    **self.special_tokens(), **variables)
        return self.encode(text, bos=False, eos=False) if tokenize else text

    def special_tokens(self) -> dict[str, str]:
        """bos_token, eos_token, unk_token, pad_token as text, for chat templates (those the model has)."""
        named = {"bos_token": self.bos_id, "eos_token": self.eos_id, "unk_token": self.unk_id, "pad_token": self.pad_id}
        return {name: self.id_to_token(i) for name, i in named.items() if 0 <= i < self.n_words}

    def id_to_token(self, i: int) -> str:
        raise NotImplementedError

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, model_type: str = "bpe",
              character_coverage: float = 1.0) -> "SentencePieceTokenizer":
        """Train a SentencePiece tokenizer (see :meth:`SentencePieceTokenizer.train`)."""
        return SentencePieceTokenizer.train(texts, vocab_size, model_type, character_coverage)

    @staticmethod
    def from_gguf(fields: Mapping[str, Any], source: str = "GGUF metadata") -> "BPETokenizer":
        """The tokenizer a GGUF file describes, from its metadata (see :meth:`BPETokenizer.from_gguf`)."""
        return BPETokenizer.from_gguf(fields, source)


# ---------------------------------------------------------------------------------------------- SentencePiece


class SentencePieceTokenizer(Tokenizer):
    """Meta LLaMA's ``tokenizer.model`` or one we trained. ``chat_template``: None unless given (Meta's
    file has none; an HF folder's tokenizer_config.json may add one, see :func:`load_tokenizer`)."""

    def __init__(self, model_path: Optional[PathLike] = None, model_proto: Optional[bytes] = None,
                 chat_template: Optional[str] = None):
        if (model_path is None) == (model_proto is None):
            raise ValueError("give exactly one of model_path or model_proto")
        if model_path is not None:
            path = Path(model_path)
            if not path.is_file():
                raise FileNotFoundError(f"tokenizer model {path} not found (expected a SentencePiece .model file)")
            model_proto = path.read_bytes()
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with a terse message
            raise ValueError(f"{model_path or 'tokenizer bytes'} is not a valid SentencePiece model: {e}") from e
        self.model_proto = model_proto
        self.source = str(model_path) if model_path is not None else "SentencePiece bytes"
        self.n_words: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.unk_id: int = self.sp.unk_id()
        self.pad_id: int = self.sp.pad_id()
        self.add_bos = self.bos_id >= 0
        self.chat_template = chat_template

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos and self.add_bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of ``ids`` (ids outside the vocabulary, e.g. a model's padding rows, are dropped). With
        ``skip_special=False`` control tokens show as their pieces (<s>, </s>)."""
        ids = [i for i in (int(i) for i in ids) if 0 <= i < self.n_words]
        if skip_special:
            return self.sp.decode(ids)
        text, run = "", []
        for i in ids:
            if self.sp.is_control(i):
                text, run = text + self.sp.decode(run) + self.sp.id_to_piece(i), []
            else:
                run.append(i)
        return text + self.sp.decode(run)

    def id_to_token(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def files(self) -> dict[str, bytes]:
        out = {"tokenizer.model": self.model_proto}
        if self.chat_template is not None:
            out["tokenizer_config.json"] = json.dumps({"chat_template": self.chat_template}, indent=2).encode()
        return out

    def save(self, path: PathLike) -> None:
        if Path(path).suffix == ".model":
            Path(path).write_bytes(self.model_proto)
        else:
            super().save(path)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, model_type: str = "bpe",
              character_coverage: float = 1.0) -> "SentencePieceTokenizer":
        """Train a SentencePiece model on ``texts`` with LLaMA's special ids (unk=0, bos=1, eos=2).

        Deterministic for the same texts and settings (single thread, no sentence sampling).
        """
        texts = list(texts)
        if not texts:
            raise ValueError("cannot train a tokenizer on an empty corpus")
        proto = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=proto,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            byte_fallback=False,
            split_digits=True,  # as LLaMA: numbers are spelt digit by digit
            minloglevel=2,
        )
        return cls(model_proto=proto.getvalue())


# ---------------------------------------------------------------------------------------------- byte-level BPE

# How GGUF's tokenizer.ggml.pre names split text before BPE, as llama.cpp does (llama-vocab.cpp):
# "digits" = every digit alone, then GPT-2's split (SmolLM2's and StarCoder's tokenizer.json);
# a regex = that split, then bytes; "gpt2" = GPT-2's split.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE_SPLITS = {
    **dict.fromkeys(["default", "gpt2", "gpt-2", "mpt", "olmo", "jais"], "gpt2"),
    **dict.fromkeys(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"], "digits"),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe"], LLAMA3_SPLIT),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen"], QWEN2_SPLIT),
}
# llama.cpp's token types (tokenizer.ggml.token_type)
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map that byte-level BPE vocabularies are written in: printable
    Latin-1 bytes stand for themselves, the other 68 (controls, space...) for chr(256 + n): space is 'Ġ'."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    return table


class BPETokenizer(Tokenizer):
    """Byte-level BPE run by Hugging Face's ``tokenizers``: byte-exact, so decode(encode(text)) == text.

    backend: a ``tokenizers.Tokenizer``; its post-processor is not used (we add BOS/EOS ourselves).
    Special tokens the backend knows (<|im_start|>) are matched whole in the text, as transformers does.
    """

    def __init__(self, backend, bos_id: int = -1, eos_id: int = -1, pad_id: int = -1, unk_id: int = -1,
                 add_bos: bool = False, chat_template: Optional[str] = None, source: str = "tokenizers backend"):
        self.backend = backend
        self.source = source
        self.n_words: int = backend.get_vocab_size(with_added_tokens=True)
        for name, value in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id), ("unk_id", unk_id)):
            if value is not None and value >= self.n_words:
                raise ValueError(f"{source}: {name}={value} is outside the vocabulary of {self.n_words} tokens")
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (-1 if v is None else int(v)
                                                              for v in (bos_id, eos_id, pad_id, unk_id))
        self.add_bos = bool(add_bos) and self.bos_id >= 0
        self.chat_template = chat_template

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos and self.add_bos else []) + ids + ([self.eos_id] if eos and self.eos_id >= 0 else [])

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of ``ids`` (ids outside the vocabulary are dropped); ``skip_special=False`` keeps
        special tokens (<|im_end|>) in the text. Bytes of a character cut in two by the end of ``ids``
        come out as U+FFFD: decode whole sequences, not token by token."""
        ids = [i for i in (int(i) for i in ids) if 0 <= i < self.n_words]
        return self.backend.decode(ids, skip_special_tokens=skip_special)

    def id_to_token(self, i: int) -> str:
        return self.backend.id_to_token(int(i))

    def files(self) -> dict[str, bytes]:
        config = {"add_bos_token": self.add_bos, "add_eos_token": False, **self.special_tokens(),
                  "tokenizer_class": "PreTrainedTokenizerFast"}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        return {"tokenizer.json": self.backend.to_str().encode(),
                "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False).encode()}

    @classmethod
    def from_folder(cls, folder: PathLike) -> "BPETokenizer":
        """A Hugging Face folder: tokenizer.json, with tokenizer_config.json (special tokens, add_bos_token,
        chat_template), chat_template.jinja and config.json (bos/eos ids) when present."""
        from tokenizers import Tokenizer as Backend

        folder = Path(folder)
        path = folder / "tokenizer.json"
        try:
            backend = Backend.from_file(str(path))
        except Exception as e:
            raise ValueError(f"{path} is not a tokenizer.json that Hugging Face's tokenizers can read: {e}") from e
        config = read_json(folder / "tokenizer_config.json")
        model_config = read_json(folder / "config.json")

        def token_id(name: str) -> int:
            token = config.get(name)
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str) and backend.token_to_id(token) is not None:
                return backend.token_to_id(token)
            value = model_config.get(f"{name}_id")  # config.json: an id, or a list of them (Llama 3's eos)
            value = value[0] if isinstance(value, list) and value else value
            return int(value) if isinstance(value, int) else -1

        bos_id = token_id("bos_token")
        if "add_bos_token" in config:
            add_bos = bool(config["add_bos_token"])
        else:  # the file's post-processor says it: Llama 3 and TinyLlama put BOS first, SmolLM2 nothing
            add_bos = bos_id >= 0 and backend.encode("", add_special_tokens=True).ids[:1] == [bos_id]
        template = config.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(backend, bos_id=bos_id, eos_id=token_id("eos_token"), pad_id=token_id("pad_token"),
                   unk_id=token_id("unk_token"), add_bos=add_bos, chat_template=template, source=str(path))

    @classmethod
    def from_gguf(cls, fields: Mapping[str, Any], source: str = "GGUF metadata") -> "BPETokenizer":
        """Rebuild the tokenizer a GGUF file describes from its metadata (name -> value; ``tokenizer.``
        may be left off the names): tokenizer.ggml.model "gpt2" (byte-level BPE), tokens, merges,
        token_type, bos/eos/unknown/padding_token_id, add_bos_token, pre (how text is split before BPE,
        as llama.cpp does), and chat_template."""
        from tokenizers import AddedToken, Tokenizer as Backend, decoders, models, pre_tokenizers, Regex

        def field(name: str, default: Any = None) -> Any:
            for key in (f"tokenizer.{name}", name, name.split(".")[-1]):
                if key in fields:
                    return fields[key]
            return default

        kind = field("ggml.model")
        if kind != "gpt2":
            raise ValueError(
                f"{source}: tokenizer.ggml.model is {kind!r}; only 'gpt2' (byte-level BPE: SmolLM2, Llama 3, Qwen2) "
                f"is rebuilt from GGUF metadata. For a SentencePiece model ('llama'), put its tokenizer.model or "
                f"tokenizer.json beside the weights and load that with load_tokenizer(folder)."
            )
        pre = field("ggml.pre") or "default"
        if pre not in GGUF_PRE_SPLITS:
            raise ValueError(f"{source}: tokenizer.ggml.pre {pre!r} is not one we know how to split text for; "
                             f"known: {', '.join(sorted(GGUF_PRE_SPLITS))}")
        tokens = [str(t) for t in field("ggml.tokens", [])]
        merges = [str(m) for m in field("ggml.merges", [])]
        if not tokens or not merges:
            raise ValueError(f"{source}: tokenizer.ggml.tokens and tokenizer.ggml.merges are needed (a byte-level "
                             f"BPE vocabulary); got {len(tokens)} tokens and {len(merges)} merges")
        types = [int(t) for t in field("ggml.token_type", [])] or [1] * len(tokens)

        # The vocabulary is written in the byte alphabet; a special token may be written as itself
        # (<|im_start|> is both), and any other token outside the alphabet is spelt out byte by byte.
        spelling = byte_alphabet()
        alphabet = set(spelling.values())
        special = {TOKEN_CONTROL, TOKEN_USER_DEFINED}
        vocab = {}
        for i, (token, kind_) in enumerate(zip(tokens, types)):
            if kind_ not in special and not set(token) <= alphabet:
                token = "".join(spelling[b] for b in token.encode("utf-8"))
            vocab.setdefault(token, i)
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        llama3_like = GGUF_PRE_SPLITS[pre] == LLAMA3_SPLIT
        backend = Backend(models.BPE(vocab, pairs, ignore_merges=llama3_like))  # Llama 3 looks a whole word up first

        split = GGUF_PRE_SPLITS[pre]
        if split == "gpt2":
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        elif split == "digits":
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        else:
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
        # Control tokens (<|im_start|>) and user-defined ones are matched whole in the text, never split.
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                    for t, k in zip(tokens, types) if k == TOKEN_CONTROL])
        backend.add_tokens([AddedToken(t, normalized=False, special=False)
                            for t, k in zip(tokens, types) if k == TOKEN_USER_DEFINED])

        def ident(name: str) -> int:
            value = field(f"ggml.{name}")
            return -1 if value is None else int(value)

        return cls(backend, bos_id=ident("bos_token_id"), eos_id=ident("eos_token_id"),
                   pad_id=ident("padding_token_id"), unk_id=ident("unknown_token_id"),
                   add_bos=bool(field("ggml.add_bos_token", False)), chat_template=field("chat_template"),
                   source=source)


# ---------------------------------------------------------------------------------------------- loading


def read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or remove it") from e


def read_gguf_tokenizer_fields(path: PathLike) -> dict[str, Any]:
    """The ``tokenizer.*`` metadata of a GGUF file, as plain Python values (read with llama.cpp's gguf)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {name: f.contents() for name, f in reader.fields.items() if name.startswith("tokenizer.")}


def load_tokenizer(path: PathLike) -> Tokenizer:
    """Open the tokenizer at ``path``: a SentencePiece ``tokenizer.model``, a ``tokenizer.json``, a ``.gguf``
    file (rebuilt from its metadata), or a folder holding tokenizer.model or tokenizer.json (tokenizer.model
    first: it is the original where an HF folder has both). A folder's tokenizer_config.json adds special
    tokens and the chat template."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return BPETokenizer.from_gguf(read_gguf_tokenizer_fields(path), source=str(path))
    if path.is_file() and path.name.endswith(".json"):
        if path.name != "tokenizer.json":
            raise ValueError(f"{path}: expected a file named tokenizer.json (or its folder)")
        return BPETokenizer.from_folder(path.parent)
    if path.is_file():
        template = read_json(path.parent / "tokenizer_config.json").get("chat_template")
        return SentencePieceTokenizer(path, chat_template=template if isinstance(template, str) else None)
    if path.is_dir():
        if (path / "tokenizer.model").is_file():
            return load_tokenizer(path / "tokenizer.model")
        if (path / "tokenizer.json").is_file():
            return BPETokenizer.from_folder(path)
        raise FileNotFoundError(f"{path} holds neither tokenizer.model (SentencePiece) nor tokenizer.json "
                                f"(Hugging Face); copy the model's tokenizer file into it")
    raise FileNotFoundError(f"tokenizer {path} not found (expected tokenizer.model, tokenizer.json, a .gguf "
                            f"file, or a folder holding one)")


# ---------------------------------------------------------------------------------------------- chat templates


def render_chat_template(template: str, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                         **variables: Any) -> str:
    """Render a model's Jinja chat template as transformers does: a sandbox (templates come with downloaded
    files), trim_blocks + lstrip_blocks, the loop controls, ``raise_exception``, ``strftime_now`` and a
    ``tojson`` that keeps non-ASCII text."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    for m in messages:
        if not isinstance(m, Mapping) or "role" not in m:
            raise ValueError(f"chat messages are dicts with 'role' and 'content'; got {m!r}")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        compiled = env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message})") from e
    return compiled.render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                           **variables)


__all__ = ["Tokenizer", "SentencePieceTokenizer", "BPETokenizer", "load_tokenizer", "read_gguf_tokenizer_fields",
           "render_chat_template", "byte_alphabet"]
