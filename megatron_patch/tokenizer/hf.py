"""Hugging Face tokenizers from a local directory, and the shipped tiny demo tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_patch.tokenizer.base import Tokenizer

TINY_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny_tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_EXPECTED = ", ".join(TOKENIZER_FILES)


class HFTokenizer(Tokenizer):
    """``transformers.AutoTokenizer`` loaded from a local directory (never the Hub)."""

    def __init__(self, path: str | None, extra_vocab_size: int = 0) -> None:
        super().__init__(path, extra_vocab_size)
        directory = self._directory()
        from transformers import AutoTokenizer

        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except Exception as error:  # transformers raises many kinds for a broken directory
            raise ValueError(f"{type(self).__name__}: cannot load a Hugging Face tokenizer "
                             f"from {directory}: {error}") from error
        if self._tokenizer.eos_token_id is None:
            raise ValueError(f"{type(self).__name__}: the tokenizer in {directory} has no EOS "
                             "token; it is needed as the end-of-document id")
        self.base_vocab_size = len(self._tokenizer)
        self.eod = self._tokenizer.eos_token_id
        pad = self._tokenizer.pad_token_id
        self.pad = self.eod if pad is None else pad

    def _directory(self) -> Path:
        kind = type(self).__name__
        if self.path is None:
            raise ValueError(f"{kind} needs a path: a local Hugging Face tokenizer directory")
        directory = Path(self.path).expanduser()
        if not directory.is_dir():
            raise FileNotFoundError(f"{kind}: {directory} is not a directory; expected a local "
                                    f"Hugging Face tokenizer directory ({_EXPECTED})")
        if not any((directory / name).is_file() for name in TOKENIZER_FILES):
            raise FileNotFoundError(f"{kind}: {directory} holds none of the tokenizer files "
                                    f"{_EXPECTED}")
        return directory

    @property
    def transformers_tokenizer(self) -> Any:
        """The underlying ``transformers`` tokenizer."""
        return self._tokenizer

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's Jinja chat template, if it has one."""
        return self._tokenizer.chat_template

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text``, with the tokenizer's own special tokens (as Megatron-LM does)."""
        return self._tokenizer(text).input_ids

    def detokenize(self, ids: list[int]) -> str:
        """Text of token ``ids`` (special tokens kept)."""
        return self._tokenizer.decode(ids)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` with no special tokens added, and each token's character span.

        Chat templates write their special tokens into the text themselves, so this is how
        ``apply_chat_template(tokenize=True)`` tokenizes a rendered conversation.
        """
        if not self._tokenizer.is_fast:
            raise ValueError(f"{type(self).__name__}: character offsets need a fast (Rust) "
                             f"tokenizer; {self.path} loads a slow one (add tokenizer.json)")
        encoded = self._tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return encoded.input_ids, encoded.offset_mapping

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool = True,
                            add_generation_prompt: bool = False, **kwargs: Any) -> Any:
        """Render ``messages`` with the chat template: token ids, or text if not ``tokenize``.

        Other keyword arguments go to ``transformers``' ``apply_chat_template`` (pass
        ``return_dict=True`` to get its dict, e.g. with ``return_assistant_tokens_mask``).
        """
        kwargs.setdefault("return_dict", False)
        return self._tokenizer.apply_chat_template(
            messages, tokenize=tokenize, add_generation_prompt=add_generation_prompt, **kwargs)


class TinyTokenizer(HFTokenizer):
    """The shipped 2048-token byte-level BPE demo tokenizer (any ``path`` is ignored)."""

    def __init__(self, path: str | None = None, extra_vocab_size: int = 0) -> None:
        super().__init__(str(TINY_TOKENIZER_DIR), extra_vocab_size)
        self.path = None  # shipped with the package: its identity does not depend on the path
