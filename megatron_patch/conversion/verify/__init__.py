"""Verification of a converted checkpoint against transformers, on the same weights and tokens.

:mod:`.logits` (max-abs logits difference, any TP/PP/EP), :mod:`.layers` (per-layer
activations), :mod:`.training` (N training steps against transformers + AdamW), :mod:`.lora`
(base + adapter against HF + PEFT), :mod:`.vlm` (vision-language models) and :mod:`.card` (the
verification card recording them). They run Megatron through :mod:`megatron_patch.training`, so
this package sits above the conversion engine, which never imports it.
"""
