"""LoRA fine-tuning on Megatron-Core, interchangeable with Hugging Face PEFT adapters: the
``import-lora`` / ``export-lora`` commands.

The machinery lives in the layer that uses it (``tests/test_import_layers.py``): the adapters
on Megatron's linears and the ``--lora-*`` settings in :mod:`megatron_patch.models.common.lora`
(argument checks and layout-invariant initialisation read them), training with adapters and
adapters-only checkpoints in :mod:`megatron_patch.training.lora` and
:mod:`megatron_patch.training.lora_checkpoint`, PEFT interchange, merging and ``verify
--adapter-dir`` in :mod:`megatron_patch.conversion.lora_peft`,
:mod:`megatron_patch.conversion.lora_merge` and :mod:`megatron_patch.conversion.verify.lora`.
"""
