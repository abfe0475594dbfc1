"""Benchmark evaluation of Megatron checkpoints through EleutherAI's lm-evaluation-harness.

* :mod:`.harness_lm` - :class:`~.harness_lm.MegatronLM`, lm-eval's ``LM`` interface on a
  checkpoint loaded by :mod:`megatron_patch.generation` (needs the ``lm-eval`` package).
* :mod:`.cli_eval` - ``megatron-patch eval``.
"""
