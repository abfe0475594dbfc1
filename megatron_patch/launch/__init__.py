"""Launchers: compose the full torchrun + Megatron flag set from a model size and switches."""
