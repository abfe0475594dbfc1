"""Vision-language families (:class:`VisionLanguageFamily`) and their shared pieces:
vision-tower configs and specs, ViT layer rules.

A vision-language model is Megatron-Core's ``LLaVAModel`` (vision tower, projector, language
model), or a family's own module of the same parts (Qwen2-VL:
:mod:`megatron_patch.models.qwen2_vl.model`), whose language model is a registered text
family. Its weight mapping reuses the text
family's rules under a prefix (:func:`~megatron_patch.mapping.rules.renamed`); rules of the
vision tower and projector carry their own ``TransformerConfig``
(:class:`~megatron_patch.mapping.rules.OwnConfig`: attention heads differ from the language
model's), and vocabulary-sized rules pad and strip their rows
(:class:`~megatron_patch.mapping.rules.VocabRows`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.activations import quick_gelu
from megatron.core.models.multimodal.llava_model import LLaVAModel
from megatron.core.models.vision.clip_vit_model import CLIPViTModel
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_patch.mapping.config import HFConfig
from megatron_patch.mapping.rules import (
    Direct,
    FusedQKV,
    GatedMLP,
    OwnConfig,
    Rule,
    StackedQKV,
    renamed,
    vocab_rows,
)
from megatron_patch.models.common.norm import PatchNorm
from megatron_patch.models.common.spec import build_layer_spec
from megatron_patch.models.registry import ModelFamily


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# transformers' ``hidden_act`` names of vision towers -> the functions
VISION_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu, "gelu_pytorch_tanh": _gelu_tanh,
                      "silu": F.silu}


def encoder_config(base: TransformerConfig, **fields: Any) -> TransformerConfig:
    """A config for a vision tower or projector: ``base`` (parallel sizes, dtype, init) with
    the tower's shapes, one pipeline stage (the tower lives on the first) and no sequence
    parallelism; extra attributes such as ``vision_model_type`` are set after construction."""
    extra = {k: fields.pop(k) for k in list(fields) if not hasattr(base, k)}
    config = dataclasses.replace(
        base, pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=None,
        num_layers_in_first_pipeline_stage=None, num_layers_in_last_pipeline_stage=None,
        sequence_parallel=False, bias_activation_fusion=False, apply_rope_fusion=False,
        qk_layernorm=False, **fields)
    for key, value in extra.items():
        setattr(config, key, value)
    return config


def bidirectional_layer_spec(config: TransformerConfig,
                             transformer_engine: bool | None = None,
                             mask_type: AttnMaskType = AttnMaskType.no_mask) -> ModuleSpec:
    """The shared layer spec with attention over all tokens (a ViT layer); ``mask_type``
    ``arbitrary`` where the caller passes a mask (e.g. keeping images apart)."""
    spec = build_layer_spec(config, transformer_engine=transformer_engine, moe=False)
    attention = spec.submodules.self_attention
    attention = dataclasses.replace(
        attention, params={**attention.params, "attn_mask_type": mask_type})
    return dataclasses.replace(
        spec, submodules=dataclasses.replace(spec.submodules, self_attention=attention))


def vit_layer_rules(megatron: str, hf: str, config: TransformerConfig, names: dict[str, str],
                    norm_bias: bool = True) -> list[Rule]:
    """Rules of a pre-norm ViT layer with biases on every linear layer.

    ``megatron`` / ``hf``: the layer prefixes with ``*`` for the index; ``names`` gives the HF
    names under ``hf`` of ``norm1 o norm2 fc2``, of ``q k v`` (separate projections) or ``qkv``
    (one ``[q; k; v]`` tensor), and of ``fc1`` or ``gate up`` (a gated MLP). ``norm_bias``:
    the norms have a bias (LayerNorm; RMSNorm has none).
    """
    rules: list[Rule] = []
    for suffix in ("weight", "bias"):
        def n(key: str, suffix: str = suffix) -> str:
            return f"{hf}{names[key]}.{suffix}"
        qkv = f"{megatron}self_attention.linear_qkv.{suffix}"
        fc1 = f"{megatron}mlp.linear_fc1.{suffix}"
        rules += [
            OwnConfig(StackedQKV(qkv, n("qkv")) if "qkv" in names
                      else FusedQKV(qkv, n("q"), n("k"), n("v")), config),
            Direct(f"{megatron}self_attention.linear_proj.{suffix}", n("o")),
            GatedMLP(fc1, n("gate"), n("up")) if "gate" in names else Direct(fc1, n("fc1")),
            Direct(f"{megatron}mlp.linear_fc2.{suffix}", n("fc2")),
        ]
        if norm_bias or suffix == "weight":
            rules += [Direct(f"{megatron}input_layernorm.{suffix}", n("norm1")),
                      Direct(f"{megatron}pre_mlp_layernorm.{suffix}", n("norm2"))]
    return rules


def used_vision_layers(num_layers: int, feature_layer: int) -> int:
    """Vision layers whose output reaches the language model when features are taken from
    ``hidden_states[feature_layer]`` (index 0: the embeddings; negative from the end)."""
    used = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
    if not 1 <= used <= num_layers:
        raise ValueError(f"config.json: vision_feature_layer={feature_layer} selects no layer "
                         f"of the {num_layers}-layer vision tower")
    return used


# The language model's vocabulary-sized parameters inside a vision-language model.
EMBEDDING_ROWS = ("language_model.embedding.word_embeddings.weight",
                  "language_model.output_layer.weight")


@dataclass
class VerifyBatch:
    """One batch for both models of ``verify``: ``megatron`` and ``hf`` are keyword arguments
    of the Megatron model chunk and of the transformers model; ``seq_length`` is the sequence
    length the language model sees."""

    megatron: dict[str, torch.Tensor | None]
    hf: dict[str, torch.Tensor]
    seq_length: int


def _no_text_rules(config: TransformerConfig, tied: bool) -> list[Rule]:
    """A vision-language family's rules depend on the checkpoint: see
    :meth:`VisionLanguageFamily.weight_rules`."""
    return []


def _none_unused(hf_config: HFConfig, hf_names: list[str]) -> list[str]:
    return []


@dataclass(frozen=True, kw_only=True)
class VisionLanguageFamily(ModelFamily):
    """A vision-language family: a registered text family's language model with a vision
    tower and a projector, built as one multimodal Megatron-Core model. Model building,
    conversion, verification and training dispatch on its methods (``isinstance(family,
    VisionLanguageFamily)``); every callable field takes the HF ``config.json`` first.

    ``hf_to_megatron`` gives the language model's Megatron arguments; the tower and projector
    are built from ``config.json`` (which the converted checkpoint records), so
    ``megatron_to_hf`` refuses and export needs that config.

    Attributes:
        text_family: ``hf_config`` -> the registered family of the language model.
        language_names: the checkpoint's HF tensor names -> the function that moves the text
            family's HF names (``model.*``, ``lm_head.*``) to where this checkpoint keeps them
            (transformers' layouts differ by version).
        vision_rules: ``(hf_config, lm_config, hf_names)`` -> the rules of the vision tower
            and the projector for a checkpoint with HF tensors ``hf_names``.
        unused_tensors: ``(hf_config, hf_names)`` -> HF tensors the model never reads (vision
            layers after the feature layer, the tower's last norm); kept beside the checkpoint.
        build: ``(hf_config, args, lm_config, pre_process, post_process, add_encoder,
            vp_stage, transformer_engine)`` -> the Megatron model chunk (tower and projector
            with ``add_encoder``).
        image_token_id: ``hf_config`` -> the token id of the image placeholder.
        image_tokens: ``hf_config`` -> the embeddings each image adds to the language model's
            sequence (square images, one placeholder each that the model expands); None where
            it depends on the image (dynamic resolution: the data expands each image).
        verify_inputs: ``(hf_config, batch_size, text_length, seed)`` -> the
            :class:`VerifyBatch` of random images and text ``verify`` feeds both models; None:
            one image per sample behind one placeholder (:meth:`verify_batch`).
        training_forward: ``(model, batch)`` -> ``(output, loss_mask)``: one micro-batch of the
            family's SFT data through the model chunk (the loss mask of its output sequence).
        packing: whether training takes packed rows (``--sft-packing``).
    """

    weight_mappings: Callable[[TransformerConfig, bool], list] = _no_text_rules
    text_family: Callable[[HFConfig], ModelFamily]
    language_names: Callable[[list[str]], Callable[[str], str]]
    vision_rules: Callable[[HFConfig, TransformerConfig, list[str]], list[Rule]]
    build: Callable[..., torch.nn.Module]
    image_token_id: Callable[[HFConfig], int]
    training_forward: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, torch.Tensor]]
    image_tokens: Callable[[HFConfig], int] | None = None
    unused_tensors: Callable[[HFConfig, list[str]], list[str]] = _none_unused
    verify_inputs: Callable[..., VerifyBatch] | None = None
    packing: bool = False

    @property
    def dynamic_resolution(self) -> bool:
        """Whether images keep their size and the data expands each one into its patches."""
        return self.image_tokens is None

    def weight_rules(self, hf_config: HFConfig, lm: TransformerConfig, tied: bool,
                     hf_names: list[str], hf_rows: int, padded: int) -> list[Rule]:
        """The weight mapping against a checkpoint holding HF tensors ``hf_names``: the text
        family's rules under ``language_model.`` (vocabulary rows padded from ``hf_rows`` to
        ``padded``), then the tower's and projector's."""
        text = renamed(self.text_family(hf_config).weight_mappings(lm, tied), "language_model.",
                       self.language_names(hf_names))
        return (vocab_rows(text, EMBEDDING_ROWS, hf_rows, padded)
                + self.vision_rules(hf_config, lm, hf_names))

    def build_chunk(self, args: Any, config: TransformerConfig, pre_process: bool,
                    post_process: bool, vp_stage: int | None = None,
                    transformer_engine: bool | None = None) -> torch.nn.Module:
        """One chunk of the model for a run's ``args``, the vision tower and projector on the
        first stage, with ``--freeze-LM`` / ``--freeze-ViT`` / ``--freeze-projector``
        applied."""
        model = self.build(vlm_hf_config(args), args, config, pre_process, post_process,
                           pre_process, vp_stage, transformer_engine)
        model.freeze(freeze_language_model=getattr(args, "freeze_lm", False),
                     freeze_vision_model=getattr(args, "freeze_vit", False),
                     freeze_vision_projection=getattr(args, "freeze_projector", False))
        return model

    def verify_batch(self, hf_config: HFConfig, batch_size: int, text_length: int,
                     seed: int = 0) -> VerifyBatch:
        """Random images and text for ``verify`` (the same on every rank): the family's
        ``verify_inputs``, else one image per sample, its placeholder at ``1 + 2 * sample``:
        once in Megatron's input (the model expands it), ``image_tokens`` times in
        transformers' (as its processor writes it)."""
        if self.verify_inputs is not None:
            return self.verify_inputs(hf_config, batch_size, text_length, seed)
        image_tokens, token = self.image_tokens(hf_config), self.image_token_id(hf_config)
        generator = torch.Generator().manual_seed(seed)
        vocab = int(hf_config["text_config"]["vocab_size"])
        ids = torch.randint(0, vocab, (batch_size, text_length), generator=generator)
        ids[ids == token] = 0
        hf_rows = []
        for sample in range(batch_size):
            where = 1 + 2 * sample
            ids[sample, where] = token
            hf_rows.append(torch.cat([ids[sample, :where], torch.full((image_tokens,), token),
                                      ids[sample, where + 1:]]))
        size = hf_config["vision_config"].get("image_size", 224)
        images = torch.randn(batch_size, 3, size, size, generator=generator)
        tiles = torch.ones(batch_size, dtype=torch.int)
        return VerifyBatch(
            megatron={"images": images, "input_ids": ids, "position_ids": None,
                      "attention_mask": None, "num_image_tiles": tiles},
            hf={"input_ids": torch.stack(hf_rows), "pixel_values": images},
            seq_length=text_length - 1 + image_tokens)


class _DropLLaVANotice(logging.Filter):
    """Megatron-Core's "LLaVA is work in progress" notice, logged for every model built."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LLaVA is work in progress" not in record.getMessage()


logging.getLogger("megatron.core.models.multimodal.llava_model").addFilter(_DropLLaVANotice())


class PatchLLaVAModel(LLaVAModel):
    """``LLaVAModel`` whose CLIP or SigLIP tower (``vision_config.vision_model_type``) uses our
    norms (Megatron-Core's default norm class for the tower without Transformer Engine,
    ``torch.nn.LayerNorm``, does not take its builder's arguments) and ends without SigLIP's
    final norm."""

    def __init__(self, *, language_config: TransformerConfig, language_spec: Any,
                 vocab_size: int, max_sequence_length: int, vision_config: TransformerConfig,
                 vision_spec: Any, projection_config: TransformerConfig, add_encoder: bool,
                 drop_class_token: bool, image_size: int, patch: int, **kwargs: Any):
        projection = MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                   linear_fc2=RowParallelLinear)
        super().__init__(language_config, language_spec, vocab_size, max_sequence_length,
                         vision_config, vision_spec, drop_class_token, projection_config,
                         projection, add_encoder=False, img_h=image_size, img_w=image_size,
                         patch_dim=patch, **kwargs)
        if add_encoder:
            self.add_encoder = True
            self._drop_vision_class_token = drop_class_token
            clip = vision_config.vision_model_type == "clip"
            self.vision_model = CLIPViTModel(
                vision_config, vision_spec, ln_pre_impl=PatchNorm, ln_post_impl=PatchNorm,
                add_class_token=clip, class_token_len=int(clip), patch_dim=patch,
                img_h=image_size, img_w=image_size,
                model_subtype=vision_config.vision_model_type, vp_stage=self.vp_stage)
            # Features are taken before the tower's last norm (transformers' hidden_states).
            self.vision_model.ln_post = None
            self.vision_projection = MultimodalProjector(
                projection_config, projection, "mlp", vision_config.hidden_size)


def vlm_hf_config(args: Any) -> dict:
    """The HF ``config.json`` of a vision-language run: ``--hf-config-path``, else the one
    recorded with the converted checkpoint ``--load``."""
    from megatron_patch.models.common.hf_config import load_hf_config
    from megatron_patch.utils.metadata import checkpoint_metadata

    if getattr(args, "hf_config_path", None):
        return load_hf_config(args.hf_config_path)
    meta = checkpoint_metadata(args.load) if getattr(args, "load", None) else None
    if not meta or "hf_config" not in meta:
        raise ValueError("a vision-language model needs its HF config.json: pass "
                         "--hf-config-path, or --load a checkpoint converted by megatron-patch")
    return meta["hf_config"]
