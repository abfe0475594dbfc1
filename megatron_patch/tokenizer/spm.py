"""SentencePiece models (a ``.model`` file, or a directory holding ``tokenizer.model``)."""

from __future__ import annotations

from megatron_patch.tokenizer.base import Tokenizer, require_file


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model; EOS ends documents, padding is its pad id (else EOS)."""

    def __init__(self, path: str | None, extra_vocab_size: int = 0) -> None:
        super().__init__(path, extra_vocab_size)
        import sentencepiece

        file = require_file(type(self).__name__, path, "tokenizer.model")
        self._model = sentencepiece.SentencePieceProcessor()
        try:
            self._model.Load(str(file))
        except (OSError, RuntimeError) as error:
            raise ValueError(f"{type(self).__name__}: {file} is not a SentencePiece model: "
                             f"{error}") from error
        if self._model.eos_id() < 0:
            raise ValueError(f"{type(self).__name__}: the model {file} has no EOS piece; "
                             "it is needed as the end-of-document id")
        self.base_vocab_size = self._model.get_piece_size()
        self.eod = self._model.eos_id()
        self.pad = self._model.pad_id() if self._model.pad_id() >= 0 else self.eod

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""
        return self._model.EncodeAsIds(text)

    def detokenize(self, ids: list[int]) -> str:
        """Text of token ``ids``."""
        return self._model.DecodeIds(list(ids))
