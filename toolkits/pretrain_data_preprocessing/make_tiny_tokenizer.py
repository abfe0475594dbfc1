"""Regenerate ``megatron_patch/assets/tiny_tokenizer/``: a 2048-token byte-level BPE tokenizer.

Trained with the ``tokenizers`` library on the shipped ``tiny_corpus.jsonl`` and the messages of
``tiny_chat.jsonl``. Special tokens: ``<|endoftext|>`` (id 0: end of document, EOS and padding),
``<|im_start|>`` and ``<|im_end|>`` (ChatML). The directory loads with
``transformers.AutoTokenizer.from_pretrained(dir, local_files_only=True)`` and carries a ChatML
chat template (assistant turns marked with ``{% generation %}`` for assistant-token masks).

    python toolkits/pretrain_data_preprocessing/make_tiny_tokenizer.py [--output DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from make_tiny_corpus import ASSETS
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 2048
EOS, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def training_text(corpus: Path, chat: Path) -> Iterator[str]:
    """Corpus documents, then each chat message as ``role\\ncontent``."""
    with open(corpus, encoding="utf-8") as lines:
        for line in lines:
            yield json.loads(line)["text"]
    with open(chat, encoding="utf-8") as lines:
        for line in lines:
            for message in json.loads(line)["messages"]:
                yield f"{message['role']}\n{message['content']}"


def train(corpus: Path, chat: Path) -> Tokenizer:
    """A byte-level BPE tokenizer of exactly ``VOCAB_SIZE`` tokens, specials first."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[EOS, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)
    tokenizer.train_from_iterator(training_text(corpus, chat), trainer=trainer)
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"trained {tokenizer.get_vocab_size()} tokens, not {VOCAB_SIZE}")
    return tokenizer


def tokenizer_config() -> dict:
    """``tokenizer_config.json`` for ``PreTrainedTokenizerFast`` with the ChatML template."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": EOS,
            "pad_token": EOS, "unk_token": None, "additional_special_tokens": [IM_START, IM_END],
            "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE}


def main(argv: list[str] | None = None) -> int:
    """Train the tokenizer and write its directory."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=ASSETS / "tiny_corpus.jsonl")
    parser.add_argument("--chat", type=Path, default=ASSETS / "tiny_chat.jsonl")
    parser.add_argument("--output", type=Path, default=ASSETS / "tiny_tokenizer")
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    train(args.corpus, args.chat).save(str(args.output / "tokenizer.json"))
    with open(args.output / "tokenizer_config.json", "w", encoding="utf-8") as out:
        json.dump(tokenizer_config(), out, indent=2)
        out.write("\n")
    print(f"{args.output}: byte-level BPE, {VOCAB_SIZE} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
