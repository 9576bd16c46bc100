"""SentencePiece tokenizer: load LLaMA's ``tokenizer.model`` or train a new one.

Layer 1 (beside model and scenes): sentencepiece only, nothing from adapterlab.

LLaMA's ids: 0 = <unk>, 1 = <s> (BOS), 2 = </s> (EOS); there is no pad token (pad_id = -1).
A tokenizer we train gets the same ids, so code never needs to know which kind it holds.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm


class Tokenizer:
    def __init__(self, model_path: str | os.PathLike | None = None, model_proto: bytes | None = None):
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
        self.n_words: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.unk_id: int = self.sp.unk_id()
        self.pad_id: int = self.sp.pad_id()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        return self.sp.decode([i for i in ids if 0 <= i < self.n_words])

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_bytes(self.model_proto)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        model_type: str = "bpe",
        character_coverage: float = 1.0,
    ) -> "Tokenizer":
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
