"""LLaVA (``LlavaForConditionalGeneration``): CLIP or SigLIP vision tower, MLP projector, a
llama-style language model (Llama, Mistral, Qwen2), on Megatron-Core's ``LLaVAModel``.

Image features are the vision tower's ``hidden_states[vision_feature_layer]`` (the tower is
built with only the layers up to it), without the class token for
``vision_feature_select_strategy="default"``; ``linear_2(gelu(linear_1(x)))`` projects them. In
Megatron's input each image is one ``image_token_id`` that the model expands to the image's
embeddings (transformers' processor repeats the token instead); positions count every
embedding, as in transformers.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_patch.mapping.config import HFConfig, UnsupportedConfigError
from megatron_patch.mapping.rules import ClassToken, Direct, Rule
from megatron_patch.models.common.hf_config import rope_parameters
from megatron_patch.models.common.vision import (
    VISION_ACTIVATIONS,
    PatchLLaVAModel,
    VisionLanguageFamily,
    bidirectional_layer_spec,
    encoder_config,
    used_vision_layers,
    vit_layer_rules,
)
from megatron_patch.models.registry import ModelFamily, get_family, register_family

_TEXT_FAMILIES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
_TOWERS = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}

_VIT_NAMES = {"norm1": "layer_norm1", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
              "v": "self_attn.v_proj", "o": "self_attn.out_proj", "norm2": "layer_norm2",
              "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


def _pick(hf: HFConfig, field: str, allowed: dict | tuple, default: Any) -> Any:
    value = hf.get(field, default)
    if value not in allowed:
        raise UnsupportedConfigError(f"config.json: {field}={value!r} is not supported "
                                     f"(expected one of {sorted(allowed)})")
    return value


def text_family(hf: HFConfig) -> ModelFamily:
    """The registered family of ``text_config``."""
    return get_family(_pick(hf.get("text_config") or {}, "model_type", _TEXT_FAMILIES, None))


def vision(hf: HFConfig) -> dict[str, Any]:
    """The checked vision settings of a LLaVA ``config.json``."""
    vc = hf.get("vision_config") or {}
    tower = _TOWERS[_pick(vc, "model_type", _TOWERS, None)]
    strategy = _pick(hf, "vision_feature_select_strategy", ("default", "full"), "default")
    if tower == "siglip" and strategy == "default":
        raise UnsupportedConfigError("config.json: vision_feature_select_strategy='default' "
                                     "with a SigLIP tower (no class token: it would drop the "
                                     "first patch) is not supported")
    layer = hf.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise UnsupportedConfigError(f"config.json: vision_feature_layer={layer!r} (several "
                                     "layers) is not supported")
    _pick(hf, "projector_hidden_act", ("gelu",), "gelu")
    size, patch = vc.get("image_size", 224), vc.get("patch_size", 32)
    return {
        "hidden": vc.get("hidden_size", 768), "ffn": vc.get("intermediate_size", 3072),
        "heads": vc.get("num_attention_heads", 12), "eps": vc.get("layer_norm_eps", 1e-5),
        "layers": vc.get("num_hidden_layers", 12), "image_size": size, "patch": patch,
        "used_layers": used_vision_layers(vc.get("num_hidden_layers", 12), layer),
        "act": VISION_ACTIVATIONS[_pick(vc, "hidden_act", VISION_ACTIVATIONS, "quick_gelu")],
        "tower": tower, "drop_cls": strategy == "default",
        "projector_bias": hf.get("multimodal_projector_bias", True),
    }


def hf_to_megatron(hf: HFConfig) -> dict[str, Any]:
    """The language model's Megatron arguments (the towers are built from ``config.json``)."""
    vision(hf)
    text = dict(hf["text_config"])
    text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", False))
    args = text_family(hf).hf_to_megatron(text)
    if args.get("hf_rope_scaling") or args.get("rotary_seq_len_interpolation_factor"):
        # Megatron-Core's LLaVA model builds its own rotary embedding (plain or llama3 only).
        raise UnsupportedConfigError(
            f"config.json: text_config rope type {rope_parameters(text)['rope_type']!r} is not "
            "supported for LLaVA (default, llama3)")
    return args


def megatron_to_hf(args: Any) -> HFConfig:
    """Not derivable from Megatron's arguments (they describe the language model only)."""
    raise UnsupportedConfigError("a LLaVA config.json cannot be rebuilt from Megatron arguments; "
                                 "pass the original model directory as --hf-template")


def image_tokens(hf: HFConfig) -> int:
    """Embeddings per image: one per patch, plus CLIP's class token for ``full``."""
    v = vision(hf)
    cls = v["tower"] == "clip" and not v["drop_cls"]
    return (v["image_size"] // v["patch"]) ** 2 + int(cls)


def image_token_id(hf: HFConfig) -> int:
    """The ``<image>`` token id."""
    return int(hf.get("image_token_id", hf.get("image_token_index", 32000)))


def _hf_prefixes(names: list[str]) -> dict[str, str]:
    """Where the parts live in this checkpoint (transformers' layouts differ by version)."""
    def before(suffix: str, default: str) -> str:
        found = [n[: -len(suffix)] for n in names if n.endswith(suffix)]
        return found[0] if found else default

    lm = before("embed_tokens.weight", "language_model.model.")
    head = "language_model.lm_head." if lm == "language_model.model." else "lm_head."
    return {"lm": lm, "head": head,
            "vision": before("embeddings.patch_embedding.weight", "vision_tower."),
            "projector": before("linear_1.weight", "multi_modal_projector.")}


def _vision_config(hf: HFConfig, lm: TransformerConfig) -> TransformerConfig:
    v = vision(hf)
    return encoder_config(
        lm, num_layers=v["used_layers"], hidden_size=v["hidden"], ffn_hidden_size=v["ffn"],
        num_attention_heads=v["heads"], num_query_groups=v["heads"],
        kv_channels=v["hidden"] // v["heads"], normalization="LayerNorm",
        layernorm_epsilon=v["eps"], add_bias_linear=True, add_qkv_bias=True,
        gated_linear_unit=False, activation_func=v["act"], vision_model_type=v["tower"])


def language_names(names: list[str]) -> Callable[[str], str]:
    """Where this checkpoint keeps the text family's HF tensors."""
    p = _hf_prefixes(names)

    def lm_name(name: str) -> str:
        return p["head"] + name[len("lm_head."):] if name.startswith("lm_head.") \
            else p["lm"] + name[len("model."):]

    return lm_name


def vision_rules(hf: HFConfig, lm: TransformerConfig, names: list[str]) -> list[Rule]:
    """The tower's and projector's rules for a checkpoint holding HF tensors ``names``."""
    p, v = _hf_prefixes(names), vision(hf)
    vis, proj = p["vision"], p["projector"]
    out: list[Rule] = [
        Direct("vision_model.conv1.weight", vis + "embeddings.patch_embedding.weight"),
        Direct("vision_model.position_embeddings.weight",
               vis + "embeddings.position_embedding.weight"),
        *vit_layer_rules("vision_model.decoder.layers.*.", vis + "encoder.layers.*.",
                         _vision_config(hf, lm), _VIT_NAMES),
    ]
    if v["tower"] == "clip":  # class token and pre-norm; SigLIP: a patch-embedding bias
        out += [ClassToken("vision_model.class_token", vis + "embeddings.class_embedding"),
                Direct("vision_model.ln_pre.weight", vis + "pre_layrnorm.weight"),
                Direct("vision_model.ln_pre.bias", vis + "pre_layrnorm.bias")]
    else:
        out.append(Direct("vision_model.conv1.bias", vis + "embeddings.patch_embedding.bias"))
    for fc, linear in (("linear_fc1", "linear_1"), ("linear_fc2", "linear_2")):
        suffixes = ("weight", "bias") if v["projector_bias"] else ("weight",)
        out += [Direct(f"vision_projection.encoder.{fc}.{s}", f"{proj}{linear}.{s}")
                for s in suffixes]
    return out


def unused(hf: HFConfig, names: list[str]) -> list[str]:
    """The tower's post-layernorm (and SigLIP's pooling head) and the layers after the
    feature layer."""
    vis, used = _hf_prefixes(names)["vision"], vision(hf)["used_layers"]
    late = tuple(f"{vis}encoder.layers.{i}." for i in range(used, vision(hf)["layers"]))
    return [n for n in names
            if n.startswith((f"{vis}post_layernorm.", f"{vis}head.", *late))]


def build(hf: HFConfig, args: argparse.Namespace, lm: TransformerConfig, pre_process: bool,
          post_process: bool, add_encoder: bool, vp_stage: int | None = None,
          transformer_engine: bool | None = None) -> PatchLLaVAModel:
    """This stage's LLaVA chunk (the vision tower and projector with ``add_encoder``)."""
    v = vision(hf)
    vision_config = _vision_config(hf, lm)
    projection_config = encoder_config(
        lm, ffn_hidden_size=lm.hidden_size, add_bias_linear=v["projector_bias"],
        gated_linear_unit=False, activation_func=F.gelu)
    family = text_family(hf)
    return PatchLLaVAModel(
        language_config=lm, language_spec=family.decoder_spec(lm, vp_stage, transformer_engine),
        vocab_size=args.padded_vocab_size, max_sequence_length=args.seq_length,
        vision_config=vision_config,
        vision_spec=bidirectional_layer_spec(vision_config, transformer_engine),
        projection_config=projection_config, add_encoder=add_encoder,
        drop_class_token=v["drop_cls"], image_size=v["image_size"], patch=v["patch"],
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        language_position_embedding_type=args.position_embedding_type,
        language_rotary_percent=args.rotary_percent, language_rotary_base=args.rotary_base,
        language_rope_scaling=args.use_rope_scaling,
        language_rope_scaling_factor=args.rope_scaling_factor, pre_process=pre_process,
        post_process=post_process, image_token_index=image_token_id(hf), vp_stage=vp_stage)


def training_forward(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch of :class:`~megatron_patch.data.multimodal.MultimodalSFTDataset`
    through the model: its images (``num_images`` of each sample's slots), one tile each."""
    slots = torch.arange(batch["images"].shape[1], device=batch["images"].device)
    images = batch["images"][slots.unsqueeze(0) < batch["num_images"].unsqueeze(1)]
    tiles = torch.ones(images.shape[0], dtype=torch.int, device=images.device)
    return model(images, batch["tokens"], None, None, labels=batch["labels"],
                 loss_mask=batch["loss_mask"], num_image_tiles=tiles)


LLAVA = register_family(
    VisionLanguageFamily(
        name="llava",
        hf_architectures=("LlavaForConditionalGeneration",),
        hf_to_megatron=hf_to_megatron,
        megatron_to_hf=megatron_to_hf,
        text_family=text_family,
        language_names=language_names,
        vision_rules=vision_rules,
        unused_tensors=unused,
        build=build,
        image_token_id=image_token_id,
        image_tokens=image_tokens,
        training_forward=training_forward,
    )
)
