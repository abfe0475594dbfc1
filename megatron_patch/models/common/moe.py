"""Mixture-of-experts mechanism shared by the MoE families (Mixtral, Qwen-MoE, DeepSeek).

A family describes its router with :class:`Router` and its layer pattern as a list of 0/1
(dense/MoE); :func:`moe_to_megatron` turns them into Megatron-Core's MoE arguments:

- routing: softmax routers whose top-k weights are renormalised (Mixtral; Qwen with
  ``norm_topk_prob``) are ``--moe-router-score-function softmax`` *without*
  ``--moe-router-pre-softmax`` (a softmax over the k largest logits equals the renormalised
  top-k of the full softmax); without renormalisation (Qwen's default) they are
  ``--moe-router-pre-softmax``. Sigmoid routers (DeepSeek-V3) are
  ``--moe-router-score-function sigmoid`` with ``--moe-router-enable-expert-bias`` (the bias
  only picks experts; the weights are the unbiased scores), group-limited top-k
  (``--moe-router-num-groups/--moe-router-group-topk``) and ``--moe-router-topk-scaling-factor``.
  The router runs in fp32 (``--moe-router-dtype fp32``).
- no token dropping: no ``--moe-expert-capacity-factor``, so every token reaches its k experts,
  as in HF inference; ``--moe-token-dispatcher-type alltoall``.
- load balancing during training: ``--moe-router-load-balancing-type aux_loss`` with the HF
  ``router_aux_loss_coef`` (Megatron adds one switch-style loss per MoE layer; HF pools all
  layers' router logits into one); it does not change the forward pass.

:class:`MoEFamily` builds each layer dense or MoE following ``config.moe_layer_freq`` (Megatron's
0/1 pattern) and :func:`moe_mlp_rules` gives the per-expert weight mapping. Experts run as
``SequentialMLP``'s modules computed with torch's grouped GEMM on the torch-native spec
(:mod:`.grouped_experts`) and as Transformer Engine's grouped GEMM with ``--moe-grouped-gemm``;
both have the same ``torch_dist`` keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_patch.mapping.config import HFConfig, MegatronArgs, UnsupportedConfigError
from megatron_patch.mapping.rules import Direct, GatedMLP, Rule
from megatron_patch.models.common.spec import build_block_spec, build_layer_spec
from megatron_patch.models.registry import ModelFamily


@dataclass(frozen=True)
class Router:
    """An HF router in the terms Megatron-Core's ``TopKRouter`` takes.

    Attributes:
        experts: routed experts; ``topk``: experts per token.
        score: ``softmax`` or ``sigmoid`` over the router logits.
        normalize: the top-k weights are renormalised to sum to 1.
        scaling: factor on the routed weights (DeepSeek's ``routed_scaling_factor``).
        groups, group_topk: group-limited routing (experts in ``groups`` groups, a token's
            experts come from its ``group_topk`` best groups, each scored by the sum of its
            ``group_score_top`` best experts: 2 for DeepSeek-V3, 1 (the best) for V2).
        expert_bias: a per-expert bias that only selects experts (DeepSeek-V3).
    """

    experts: int
    topk: int
    score: str = "softmax"
    normalize: bool = True
    scaling: float = 1.0
    groups: int | None = None
    group_topk: int | None = None
    group_score_top: int = 2
    expert_bias: bool = False


def _router_args(router: Router) -> MegatronArgs:
    if router.score == "softmax":
        if router.topk == 1 and router.normalize:
            raise UnsupportedConfigError(
                "config.json: num_experts_per_tok=1 with renormalised top-k weights (always "
                "1.0) is not supported (Megatron needs --moe-router-pre-softmax for top-1)")
        pre_softmax = not router.normalize
    elif router.score == "sigmoid":
        if router.normalize != (router.topk > 1):
            raise UnsupportedConfigError(
                f"config.json: norm_topk_prob={router.normalize} with num_experts_per_tok="
                f"{router.topk} is not supported (Megatron renormalises sigmoid top-k weights "
                "exactly when k > 1)")
        pre_softmax = False
    else:
        raise UnsupportedConfigError(f"config.json: router scoring {router.score!r} is not "
                                     "supported (softmax, sigmoid)")
    grouped = bool(router.groups and router.group_topk and router.group_topk < router.groups)
    if grouped and (router.experts % router.groups
                    or router.topk // router.group_topk != router.group_score_top):
        raise UnsupportedConfigError(
            f"config.json: group-limited routing with n_group={router.groups}, topk_group="
            f"{router.group_topk}, num_experts_per_tok={router.topk} is not supported (Megatron "
            "scores a group by its top num_experts_per_tok/topk_group experts, HF by its top "
            f"{router.group_score_top})")
    return {
        "moe_router_topk": router.topk,
        "moe_router_score_function": router.score,
        "moe_router_pre_softmax": pre_softmax,
        "moe_router_topk_scaling_factor": None if router.scaling == 1.0 else router.scaling,
        "moe_router_num_groups": router.groups if grouped else None,
        "moe_router_group_topk": router.group_topk if grouped else None,
        "moe_router_enable_expert_bias": router.expert_bias,
        "moe_router_dtype": "fp32",
    }


def moe_to_megatron(
    router: Router,
    *,
    ffn_hidden_size: int,
    moe_layers: list[int],
    shared_ffn_hidden_size: int | None = None,
    shared_gate: bool = False,
    aux_loss_coeff: float = 0.0,
    aux_loss_type: str = "aux_loss",
    input_jitter: float | None = None,
) -> MegatronArgs:
    """Megatron MoE arguments reproducing HF inference (see the module docstring).

    ``moe_layers``: 1 for each layer with routed experts, 0 for a dense one.
    """
    if router.experts < 1:
        raise UnsupportedConfigError("config.json: the number of routed experts must be >= 1")
    if len(moe_layers) and not any(moe_layers):
        raise UnsupportedConfigError("config.json: no layer has routed experts (mlp_only_layers"
                                     " / decoder_sparse_step / first_k_dense_replace)")
    return {
        "num_experts": router.experts,
        "moe_ffn_hidden_size": ffn_hidden_size,
        **_router_args(router),
        "moe_layer_freq": 1 if all(moe_layers) else list(moe_layers),
        "moe_shared_expert_intermediate_size": shared_ffn_hidden_size or None,
        "moe_shared_expert_gate": bool(shared_ffn_hidden_size) and shared_gate,
        "moe_token_dispatcher_type": "alltoall",
        "moe_router_load_balancing_type": [aux_loss_type],
        "moe_aux_loss_coeff": [aux_loss_coeff],
        "moe_input_jitter_eps": input_jitter or None,
    }


def moe_layer_pattern(args: Any) -> list[int]:
    """Megatron's ``moe_layer_freq`` as one 0/1 per layer (1: routed experts)."""
    freq = args.moe_layer_freq
    if isinstance(freq, int):
        return [int(i % freq == 0) for i in range(args.num_layers)]
    return list(freq)


def aux_loss_coeff(args: Any) -> float:
    """The (single) auxiliary-loss coefficient of Megatron args, list or scalar."""
    coeff = args.moe_aux_loss_coeff
    return float(coeff[0] if isinstance(coeff, list | tuple) else coeff)


def moe_mlp_rules(hf_mlp: str, *, router: str, experts: str, gate: str, up: str, down: str,
                  shared: str | None = None, shared_gate: str | None = None,
                  expert_bias: str | None = None) -> list[Rule]:
    """HF <-> Megatron rules of a MoE layer's router, routed and shared experts.

    Names are relative to ``hf_mlp`` (e.g. ``model.layers.*.mlp.``); ``experts`` is the module
    list of routed experts, each with ``gate``/``up``/``down`` projections named as given.
    """
    m = "decoder.layers.*.mlp."
    expert = f"{hf_mlp}{experts}.*."
    rules: list[Rule] = [
        Direct(m + "router.weight", f"{hf_mlp}{router}.weight"),
        GatedMLP(m + "experts.local_experts.*.linear_fc1.weight",
                 f"{expert}{gate}.weight", f"{expert}{up}.weight"),
        Direct(m + "experts.local_experts.*.linear_fc2.weight", f"{expert}{down}.weight"),
    ]
    if shared:
        rules += [
            GatedMLP(m + "shared_experts.linear_fc1.weight", f"{hf_mlp}{shared}.{gate}.weight",
                     f"{hf_mlp}{shared}.{up}.weight"),
            Direct(m + "shared_experts.linear_fc2.weight", f"{hf_mlp}{shared}.{down}.weight"),
        ]
    if shared_gate:
        rules.append(Direct(m + "shared_experts.gate_weight", f"{hf_mlp}{shared_gate}.weight"))
    if expert_bias:
        rules.append(Direct(m + "router.expert_bias", f"{hf_mlp}{expert_bias}"))
    return rules


@dataclass(frozen=True)
class MoEFamily(ModelFamily):
    """A family whose layers are dense or mixture-of-experts following ``moe_layer_freq``."""

    def layer_spec(self, config: TransformerConfig, transformer_engine: bool | None = None,
                   moe: bool | None = None) -> ModuleSpec:
        """Decoder-layer spec; ``moe`` False gives the dense variant of a MoE model's layer."""
        return build_layer_spec(config, self.qk_layernorm, transformer_engine, moe)

    def decoder_spec(self, config: TransformerConfig, vp_stage: int | None = None,
                     transformer_engine: bool | None = None) -> TransformerBlockSubmodules:
        """Decoder-block spec of one pipeline (virtual) stage, dense and MoE layers mixed."""
        pattern = moe_layer_pattern(config)
        specs = {flag: self.layer_spec(config, transformer_engine, moe=bool(flag))
                 for flag in set(pattern)}
        return build_block_spec(config, [specs[flag] for flag in pattern], vp_stage,
                                transformer_engine)


def first_dense_layers(pattern: list[int], field: str) -> int:
    """How many leading layers are dense, for a pattern of dense layers then MoE layers."""
    dense = pattern.index(1) if 1 in pattern else len(pattern)
    if any(flag == 0 for flag in pattern[dense:]):
        raise UnsupportedConfigError(f"moe_layer_freq={pattern} has dense layers after MoE "
                                     f"layers; {field} describes only leading dense layers")
    return dense


def routed_experts(hf: HFConfig, *fields: str) -> int:
    """The number of routed experts, from the first of ``fields`` the config sets."""
    for field in fields:
        if hf.get(field) is not None:
            return int(hf[field])
    raise UnsupportedConfigError(f"config.json: none of {list(fields)} is set (number of "
                                 "routed experts)")
