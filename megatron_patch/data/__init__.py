"""Pretraining data tools: raw text -> Megatron ``.bin``/``.idx`` indexed datasets, and merging.

``megatron-patch preprocess`` (:mod:`.pretrain_preprocess`) and ``megatron-patch merge-datasets``
(:mod:`.merge_datasets`) follow Megatron-LM's ``tools/preprocess_data.py`` and
``tools/merge_datasets.py``: same flags, same output names, byte-identical files.
"""
