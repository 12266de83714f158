"""Tokenizers behind one small interface: a sentencepiece model trained on the task corpus (tiny demo)
or a Hugging Face tokenizer directory (real models).

``encode`` never adds special tokens; callers add BOS/EOS where they want them. ``decode`` drops
pad/eos/bos ids; stopping at EOS is the caller's job.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path

from megatron_rspo.errors import TokenizerError

DEFAULT_SPECIAL_SYMBOLS = ("<answer>", "</answer>")
# Fixed ids for the sentencepiece models we train (sentencepiece's own default puts unk first).
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3


class Tokenizer(ABC):
    """What the rest of the code needs from a tokenizer."""

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def eos_id(self) -> int: ...

    @property
    @abstractmethod
    def pad_id(self) -> int: ...

    @property
    @abstractmethod
    def bos_id(self) -> int | None: ...

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Every id that ends a response, ``eos_id`` first (a model may list several EOS ids)."""
        return (self.eos_id,)

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without special tokens."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; pad/eos/bos ids (and ids outside the vocabulary) are dropped."""

    def _strip_specials(self, ids: Sequence[int]) -> list[int]:
        # Out-of-range ids are dropped too: Megatron pads the model's vocab (e.g. to a multiple of 128),
        # so a sampler can emit ids the tokenizer does not have.
        drop, n = {self.pad_id, self.bos_id, *self.stop_ids}, self.vocab_size
        return [int(i) for i in ids if int(i) not in drop and 0 <= int(i) < n]


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_file: str | os.PathLike) -> None:
        import sentencepiece as spm

        self.model_file = str(model_file)
        self._sp = spm.SentencePieceProcessor(model_file=self.model_file)
        if self._sp.eos_id() < 0:
            raise ValueError(f"{model_file}: sentencepiece model has no EOS piece")

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        pad = self._sp.pad_id()
        return pad if pad >= 0 else self.eos_id

    @property
    def bos_id(self) -> int | None:
        bos = self._sp.bos_id()
        return bos if bos >= 0 else None

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(self._strip_specials(ids))

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def pieces(self) -> list[str]:
        return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]


def train_sentencepiece(
    texts: Iterable[str],
    model_prefix: str | os.PathLike,
    vocab_size: int = 64,
    model_type: str = "bpe",
    user_defined_symbols: Sequence[str] = DEFAULT_SPECIAL_SYMBOLS,
    split_digits: bool = True,
) -> SentencePieceTokenizer:
    """Train a sentencepiece model on ``texts`` and write ``<model_prefix>.model`` / ``.vocab``.

    Deterministic (one thread, no sampling or shuffling). Text is not normalised, no dummy prefix is
    added and whitespace is kept as is, so ``decode(encode(x)) == x`` for any text made of characters
    seen in training. ``vocab_size`` is a soft limit (a tiny corpus may give fewer pieces). Digits are
    split into single pieces, which helps a small model with arithmetic; the ``user_defined_symbols``
    (the answer tags by default) are always single pieces."""
    import sentencepiece as spm

    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_sentencepiece: no training text")
    Path(model_prefix).parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(1234)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=str(model_prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        bos_id=BOS_ID,
        unk_id=UNK_ID,
        user_defined_symbols=list(user_defined_symbols),
        split_digits=split_digits,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        hard_vocab_limit=False,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=1 << 16,
        num_threads=1,
        minloglevel=2,
    )
    return SentencePieceTokenizer(f"{model_prefix}.model")


class HFTokenizer(Tokenizer):
    """A local Hugging Face tokenizer directory (never downloads). Pad falls back to EOS."""

    def __init__(self, directory: str | os.PathLike) -> None:
        from transformers import AutoTokenizer  # heavy import: only when an HF tokenizer is used

        self.directory = str(directory)
        self._tok = AutoTokenizer.from_pretrained(self.directory, local_files_only=True)
        if self._tok.eos_token_id is None:
            raise ValueError(f"{directory}: tokenizer has no eos_token")
        self._stop_ids = self._read_stop_ids()

    @property
    def vocab_size(self) -> int:
        return len(self._tok)  # includes added tokens, unlike ``tokenizer.vocab_size``

    @property
    def eos_id(self) -> int:
        return self._tok.eos_token_id

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The tokenizer's EOS, then every ``eos_token_id`` of the directory's generation_config.json (Qwen3
        lists <|im_end|> and <|endoftext|>; a chat model that ended with the other one would run on)."""
        return self._stop_ids

    def _read_stop_ids(self) -> tuple[int, ...]:
        ids = [self.eos_id]
        for name in ("generation_config.json", "config.json"):
            path = os.path.join(self.directory, name)
            if not os.path.isfile(path):
                continue
            try:
                with open(path) as fh:
                    eos = json.load(fh).get("eos_token_id")
            except (OSError, ValueError, AttributeError) as e:
                raise TokenizerError(f"{path}: cannot read its eos_token_id: {e}") from e
            for i in eos if isinstance(eos, list) else [eos]:
                if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.vocab_size and i not in ids:
                    ids.append(i)
        return tuple(ids)

    @property
    def pad_id(self) -> int:
        pad = self._tok.pad_token_id
        return self.eos_id if pad is None else pad

    @property
    def bos_id(self) -> int | None:
        return self._tok.bos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(self._strip_specials(ids), clean_up_tokenization_spaces=False)

    def apply_chat_template(self, user: str, system: str | None = None) -> str:
        """``user`` (and ``system``) wrapped in the model's chat template, ready for generation."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A ``.model`` file -> sentencepiece; a directory with tokenizer.json / tokenizer_config.json ->
    Hugging Face; a directory holding only ``tokenizer.model`` (our data directories) -> sentencepiece."""
    p = Path(path)
    if not p.exists():
        raise TokenizerError(f"cannot load a tokenizer from {str(path)!r}: no such file or directory")
    kind, source = None, p
    if p.is_file() and p.suffix == ".model":
        kind = SentencePieceTokenizer
    elif p.is_dir():
        if (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file():
            kind = HFTokenizer
        elif (p / "tokenizer.model").is_file():
            kind, source = SentencePieceTokenizer, p / "tokenizer.model"
    if kind is not None:
        try:
            return kind(source)
        except (OSError, RuntimeError, ValueError) as e:  # what sentencepiece / transformers raise for a bad file
            raise TokenizerError(f"cannot load a tokenizer from {str(source)!r}: {e}") from e
    raise TokenizerError(
        f"cannot load a tokenizer from {str(path)!r}: expected a sentencepiece '.model' file or a directory "
        "with tokenizer.json / tokenizer_config.json (Hugging Face) or tokenizer.model"
    )
