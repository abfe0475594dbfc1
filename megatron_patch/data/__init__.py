"""Data tools: raw text -> Megatron ``.bin``/``.idx`` indexed datasets, merging, and SFT data.

``megatron-patch preprocess`` (:mod:`.pretrain_preprocess`) and ``megatron-patch merge-datasets``
(:mod:`.merge_datasets`) follow Megatron-LM's ``tools/preprocess_data.py`` and
``tools/merge_datasets.py``: same flags, same output names, byte-identical files.

Supervised fine-tuning: chat/instruction formats (:mod:`.sft_format`), assistant masks
(:mod:`.sft_encoder`), sources (:mod:`.sft_sources`), padded or packed rows (:mod:`.packing`),
the Megatron dataset (:mod:`.sft`) and ``megatron-patch preprocess-sft``
(:mod:`.sft_preprocess`).
"""
