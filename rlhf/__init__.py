"""Post-training of megatron-patch models: reward models, DPO and GRPO (see ``rlhf/README.md``).

Entry points: ``python -m rlhf.reward_model``, ``python -m rlhf.dpo``, ``python -m rlhf.grpo``
(Megatron-LM training flags plus their own; launch with torchrun for TP/PP/DP).
"""

import megatron_patch  # noqa: F401,E402  (its warning filters apply before Megatron is imported)
