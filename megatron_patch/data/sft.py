"""SFT datasets for the ``finetune`` entry point, built by Megatron-Core's dataset builder.

Data flags are Megatron-LM's (and Pai-Megatron-Patch's): ``--data-path`` with ``--split``, or
``--train-data-path`` / ``--valid-data-path`` / ``--test-data-path``, weighted blends included.
Each path is raw chat/instruction data (``.jsonl``/``.json``/``.parquet`` file or directory; see
:mod:`.sft_format`) or a pre-tokenized prefix (``megatron-patch preprocess-sft``). Splits are
taken over samples; each split is shuffled (``--seed``) and then:

* padded (default): one sample per row, padded to ``--seq-length``; longer samples are
  truncated on the right (samples left with no assistant token are reported and skipped);
* packed (``--sft-packing``): samples are packed first-fit into rows of ``--seq-length``
  tokens, never split; each row records its documents (``cu_seqlens``) so that attention stays
  within a document and positions restart (:mod:`.packing`).

Rows are served in a new random order every epoch. Loss covers the assistant tokens (answers and
their end-of-turn tokens) only, or every sample token with ``--sft-train-on-prompt``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy
import torch
from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
from megatron.core.datasets.megatron_dataset import MegatronDataset
from megatron.core.datasets.utils import Split

from megatron_patch.data.packing import build_row, pack_first_fit
from megatron_patch.data.sft_sources import load_sft_samples


@dataclass(kw_only=True)
class SFTDatasetConfig(BlendedMegatronDatasetConfig):
    """Megatron's dataset config plus the SFT switches."""

    packing: bool = False
    train_on_prompt: bool = False
    on_error: str = "fail"


class SFTDataset(MegatronDataset):
    """One split of one SFT source: rows of ``sequence_length`` tokens (see module doc)."""

    def __init__(self, dataset, dataset_path: str | None, indices: numpy.ndarray,
                 num_samples: int | None, index_split: Split, config: SFTDatasetConfig) -> None:
        with warnings.catch_warnings():
            # Megatron warns when pad == EOD because GPT datasets mask pad tokens out of the
            # loss; SFT rows carry an explicit loss mask, so the ambiguity does not arise.
            warnings.simplefilter("ignore")
            super().__init__(dataset, dataset_path, indices, num_samples, index_split, config)
        order = indices[numpy.random.RandomState(config.random_seed).permutation(len(indices))]
        if config.packing:
            rows = pack_first_fit(dataset.lengths[order], config.sequence_length)
            self.items = order[numpy.concatenate(rows or [[]]).astype(numpy.int64)]
            self.bounds = numpy.cumsum([0] + [len(row) for row in rows])
        else:
            self.items, self.bounds = order, numpy.arange(len(order) + 1)
        self._epoch: tuple[int, numpy.ndarray] | None = None

    @property
    def num_rows(self) -> int:
        """Rows in one epoch."""
        return len(self.bounds) - 1

    def __len__(self) -> int:
        if self.num_rows == 0:
            return 0
        return self.num_samples if self.num_samples is not None else self.num_rows

    def _row_order(self, epoch: int) -> numpy.ndarray:
        if self._epoch is None or self._epoch[0] != epoch:
            seed = (self.config.random_seed + epoch) % 2**32
            self._epoch = epoch, numpy.random.RandomState(seed).permutation(self.num_rows)
        return self._epoch[1]

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        epoch, position = divmod(int(idx), self.num_rows)
        row = self._row_order(epoch)[position]
        samples = [self.dataset[int(i)] for i in self.items[self.bounds[row]:self.bounds[row + 1]]]
        return build_row(samples, self.config.sequence_length, self.config.tokenizer.pad,
                         train_on_prompt=self.config.train_on_prompt, packed=self.config.packing)

    @staticmethod
    def numel_low_level_dataset(low_level_dataset) -> int:
        """Samples of the source (splits divide samples, before packing)."""
        return len(low_level_dataset)

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: SFTDatasetConfig):
        """The trainable samples of one SFT source."""
        return load_sft_samples(dataset_path, config.tokenizer, config.sequence_length,
                                packing=config.packing, train_on_prompt=config.train_on_prompt,
                                on_error=config.on_error, mmap=config.mmap_bin_files)

    @staticmethod
    def _key_config_attributes() -> list[str]:
        return [*MegatronDataset._key_config_attributes(), "packing", "train_on_prompt"]

