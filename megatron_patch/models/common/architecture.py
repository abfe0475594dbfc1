"""Architecture options that Megatron-Core's ``TransformerConfig`` lacks, and their flags.

:class:`PatchTransformerConfig` adds the switches the Bloom, Falcon, StarCoder, GLM, Baichuan and
OPT families need; every switch defaults to "off", so for every other family the config (and the
model built from it) is exactly Megatron-Core's. Each field has a command-line flag of the same
name (:func:`add_architecture_arguments`), so a family's config mapper can return it like any
Megatron argument and ``core_transformer_config_from_args`` copies it into the config.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_patch.models.common.rope import HF_ROPE_TYPES


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GeLU with the tanh approximation (HF ``gelu_pytorch_tanh``/``gelu_new``, Bloom's GeLU)."""
    return F.gelu(x, approximate="tanh")


# --mlp-activation value -> the non-gated MLP activation it names.
MLP_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": gelu_tanh,
    "relu": F.relu,
}


@dataclass
class PatchTransformerConfig(TransformerConfig):
    """``TransformerConfig`` plus megatron-patch's architecture switches (all off by default).

    Attributes:
        alibi: ALiBi attention bias instead of position embeddings
            (:class:`~megatron_patch.models.common.alibi.ALiBiAttention`).
        parallel_attention_mlp: attention and MLP read the same input and their outputs are
            added into one residual (:class:`~megatron_patch.models.common.layers.
            ParallelAttentionMLPLayer`).
        parallel_attention_norms: with ``parallel_attention_mlp``, 1: one input norm shared by
            attention and MLP; 2: separate ``input_layernorm`` and ``pre_mlp_layernorm``.
        post_sublayer_norms: a norm on the attention and on the MLP output before each
            residual add (GLM-4's "sandwich" norms).
        embedding_layernorm: a norm on the word embeddings (Bloom).
        lm_head_norm: the output layer uses L2-normalised rows of its weight (Baichuan2 NormHead).
        position_id_offset: learned absolute position embeddings are indexed at
            ``position + offset`` (OPT's 2); the table has ``offset`` extra rows.
        mlp_activation: ``gelu`` (erf), ``gelu_tanh`` or ``relu`` for a non-gated MLP; None
            leaves Megatron's choice (GeLU, or SwiGLU with ``--swiglu``). Setting it switches
            off the bias-activation fusion, whose GeLU kernel is the tanh approximation.
    """

    alibi: bool = False
    parallel_attention_mlp: bool = False
    parallel_attention_norms: int = 1
    post_sublayer_norms: bool = False
    embedding_layernorm: bool = False
    lm_head_norm: bool = False
    position_id_offset: int = 0
    mlp_activation: str | None = None
    hf_rope_scaling: dict | None = None

    def __post_init__(self) -> None:
        if self.mlp_activation is not None:
            if self.mlp_activation not in MLP_ACTIVATIONS:
                raise ValueError(f"mlp_activation={self.mlp_activation!r}; use one of "
                                 f"{sorted(MLP_ACTIVATIONS)}")
            if self.gated_linear_unit:
                raise ValueError("mlp_activation applies to non-gated MLPs; drop --swiglu")
            self.activation_func = MLP_ACTIVATIONS[self.mlp_activation]
            self.bias_activation_fusion = False
        if self.parallel_attention_norms not in (1, 2):
            raise ValueError(f"parallel_attention_norms={self.parallel_attention_norms}; "
                             "expected 1 or 2")
        if self.hf_rope_scaling is not None:
            _check_hf_rope(self)
        super().__post_init__()


def _check_hf_rope(config: PatchTransformerConfig) -> None:
    """Keep Megatron-Core off the rope paths that skip the attention scaling of HF ropes."""
    kind = config.hf_rope_scaling.get("rope_type")
    if kind not in HF_ROPE_TYPES:
        raise ValueError(f"hf_rope_scaling rope_type={kind!r}; use one of {list(HF_ROPE_TYPES)}")
    for flag in ("fused_single_qkv_rope", "flash_decode", "multi_latent_attention"):
        if getattr(config, flag):
            raise ValueError(f"--hf-rope-scaling does not support --{flag.replace('_', '-')} "
                             "(Megatron-Core applies its own rope there)")
    if kind in ("yarn", "longrope"):
        # Transformer Engine's fused rope has no cos/sin scale; Megatron-Core falls back to its
        # unfused rope for it, except for packed (THD) sequences, where the scale would be lost.
        config.apply_rope_fusion = False


def _rope_dict(text: str) -> dict:
    """``--hf-rope-scaling`` value: a JSON object naming one of :data:`HF_ROPE_TYPES`."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc})") from exc
    if not isinstance(value, dict) or value.get("rope_type") not in HF_ROPE_TYPES:
        raise argparse.ArgumentTypeError(
            f"expected a JSON object with rope_type one of {list(HF_ROPE_TYPES)}, got {text}")
    return value


def add_architecture_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per :class:`PatchTransformerConfig` switch (same names as its fields)."""
    group = parser.add_argument_group("megatron-patch architecture")
    group.add_argument("--alibi", action="store_true",
                       help="ALiBi attention bias (Bloom, Baichuan-13B); use with "
                            "--position-embedding-type none.")
    group.add_argument("--parallel-attention-mlp", action="store_true",
                       help="Attention and MLP in parallel on one residual (Falcon).")
    group.add_argument("--parallel-attention-norms", type=int, default=1, choices=[1, 2],
                       help="With --parallel-attention-mlp: one shared input norm, or one each.")
    group.add_argument("--post-sublayer-norms", action="store_true",
                       help="Norms on the attention and MLP outputs before the residual add "
                            "(GLM-4).")
    group.add_argument("--embedding-layernorm", action="store_true",
                       help="Norm on the word embeddings (Bloom).")
    group.add_argument("--lm-head-norm", action="store_true",
                       help="Output layer with L2-normalised weight rows (Baichuan2 NormHead).")
    group.add_argument("--position-id-offset", type=int, default=0,
                       help="Offset added to positions for learned position embeddings (OPT: 2).")
    group.add_argument("--hf-rope-scaling", type=_rope_dict, default=None,
                       help="HF rope dict as JSON (rope_type dynamic, yarn, longrope or llama3 "
                            "and its fields), e.g. from config.json's rope_scaling.")
    group.add_argument("--mlp-activation", default=None, choices=sorted(MLP_ACTIVATIONS),
                       help="Activation of a non-gated MLP (default: Megatron's GeLU).")
