"""Qwen2-VL / Qwen2.5-VL (``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``): a ViT with 2-D rotary embeddings (Qwen2.5-VL: window
attention, RMSNorm, SwiGLU), a patch merger, and the Qwen2 language model with M-RoPE.

One family, ``qwen2_vl``, for both ``model_type`` values. The model chunk and its forward are
:mod:`.model` (``model(input_ids=, position_ids=[3, B, S], pixel_values=, image_grid_thw=,
labels=, loss_mask=)``, returning the per-token loss with labels); the M-RoPE positions
:mod:`.rope_index`; the tower :mod:`.tower`. For the data pipeline, the family
(:class:`~megatron_patch.models.common.vision.VisionLanguageFamily`) gives
``image_token_id(hf_config)``, and :func:`vision` the checked tower settings (``patch``,
``temporal_patch``, ``merge``, ``channels``, ...) of a ``config.json``.

Checkpoints of transformers 5 (``model.visual.*``, ``model.language_model.*``, ``lm_head``) and
older ones (``visual.*``, ``model.*``, ``lm_head``) convert and export under their own names;
``config.json`` may nest the language model in ``text_config`` (transformers 5) or hold it at
the top level, with the M-RoPE sections in ``rope_parameters`` or ``rope_scaling``. Videos are
not supported (``video_token_id`` is never replaced).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import flatten_batch_for_packed_sequences

from megatron_patch.mapping.config import HFConfig, UnsupportedConfigError
from megatron_patch.mapping.rules import Direct, Reshaped, Rule
from megatron_patch.models.common.hf_config import _expect, rope_parameters
from megatron_patch.models.common.packed_seq import document_causal_mask
from megatron_patch.models.common.vision import (
    VISION_ACTIVATIONS,
    VerifyBatch,
    VisionLanguageFamily,
    bidirectional_layer_spec,
    encoder_config,
    vit_layer_rules,
)
from megatron_patch.models.qwen2_vl.model import Qwen2VLModel
from megatron_patch.models.qwen2_vl.rope_index import rope_index
from megatron_patch.models.qwen2_vl.tower import NORM_EPS
from megatron_patch.models.registry import ModelFamily, get_family, register_family

_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
_DEFAULT_MROPE = [16, 24, 24]  # transformers' default sections (temporal, height, width)
_VIT_NAMES = {"norm1": "norm1", "qkv": "attn.qkv", "o": "attn.proj", "norm2": "norm2"}
_MLP_NAMES = {"qwen2_vl": {"fc1": "mlp.fc1", "fc2": "mlp.fc2"},
              "qwen2_5_vl": {"gate": "mlp.gate_proj", "up": "mlp.up_proj",
                             "fc2": "mlp.down_proj"}}


def _text_config(hf: HFConfig) -> HFConfig:
    """The language model's fields (``text_config``, or the top level of older configs)."""
    text = hf.get("text_config") or {k: v for k, v in hf.items() if k != "vision_config"}
    return dict(text)


def tied_embeddings(hf: HFConfig) -> bool:
    """Whether ``lm_head`` is the embedding (transformers reads the top-level field, which a
    ``text_config`` with tied embeddings also sets)."""
    return bool(hf.get("tie_word_embeddings") or _text_config(hf).get("tie_word_embeddings"))


def mrope_section(hf: HFConfig) -> list[int]:
    """The M-RoPE channel-pair sections (temporal, height, width) of the language model."""
    text = _text_config(hf)
    section = [int(s) for s in rope_parameters(text).get("mrope_section") or _DEFAULT_MROPE]
    head_dim = int(text.get("hidden_size", 0)) // int(text.get("num_attention_heads", 1))
    if len(section) != 3 or 2 * sum(section) != head_dim:
        raise UnsupportedConfigError(f"config.json: mrope_section={section} must be three "
                                     f"sections of {head_dim // 2} channel pairs in all")
    return section


def vision(hf: HFConfig) -> dict[str, Any]:
    """The checked vision-tower settings of a Qwen2-VL / Qwen2.5-VL ``config.json``."""
    kind = _expect(hf, "model_type", _MODEL_TYPES, None)
    vc = hf.get("vision_config") or {}
    if kind == "qwen2_vl":
        width = int(vc.get("embed_dim", 1280))
        ffn, out = int(width * vc.get("mlp_ratio", 4)), int(vc.get("hidden_size", 3584))
        act = _expect(vc, "hidden_act", ("quick_gelu", "gelu", "silu"), "quick_gelu")
    else:
        width, ffn = int(vc.get("hidden_size", 3584)), int(vc.get("intermediate_size", 3420))
        out = int(vc.get("out_hidden_size", 3584))
        act = _expect(vc, "hidden_act", ("silu", "gelu", "quick_gelu"), "silu")
    heads = int(vc.get("num_heads", vc.get("num_attention_heads", 16)))
    settings = {
        "kind": kind, "width": width, "ffn": ffn, "out": out, "act": VISION_ACTIVATIONS[act],
        "heads": heads, "layers": int(vc.get("depth", vc.get("num_hidden_layers", 32))),
        "channels": int(vc.get("in_channels", vc.get("in_chans", 3))),
        "patch": vc.get("patch_size", 14), "temporal_patch": vc.get("temporal_patch_size", 2),
        "merge": vc.get("spatial_merge_size", 2),
        "rope_theta": float((vc.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
        "window": None, "full_attention_layers": (),
    }
    for field in ("patch", "temporal_patch", "merge"):
        if not isinstance(settings[field], int) or settings[field] < 1:
            raise UnsupportedConfigError(f"config.json: vision_config {field} size "
                                         f"{settings[field]!r} is not supported (one integer)")
    if width % heads or (width // heads) % 4:
        raise UnsupportedConfigError(f"config.json: vision hidden size {width} over {heads} "
                                     "heads must give a head size divisible by 4 (2-D rope)")
    if out != int(_text_config(hf).get("hidden_size", out)):
        raise UnsupportedConfigError(f"config.json: the merger's output size {out} is not the "
                                     "language model's hidden_size")
    if kind == "qwen2_5_vl":
        window = int(vc.get("window_size", 112)) // settings["merge"] // settings["patch"]
        if window < 1:
            raise UnsupportedConfigError(f"config.json: window_size={vc.get('window_size')} "
                                         "is smaller than one merged patch")
        settings["window"] = window
        settings["full_attention_layers"] = tuple(
            int(i) for i in vc.get("fullatt_block_indexes", (7, 15, 23, 31)))
    return settings


def text_family(hf: HFConfig) -> ModelFamily:
    """The language model's family (Qwen2)."""
    return get_family("qwen2")


def hf_to_megatron(hf: HFConfig) -> dict[str, Any]:
    """The language model's Megatron arguments, with M-RoPE (the tower is built from
    ``config.json``)."""
    vision(hf)
    section = mrope_section(hf)
    text = _text_config(hf)
    rope = rope_parameters(text)
    text.pop("rope_scaling", None)
    text["rope_parameters"] = {"rope_type": "default" if rope["rope_type"] == "mrope"
                               else rope["rope_type"], "rope_theta": rope["rope_theta"]}
    text["tie_word_embeddings"] = tied_embeddings(hf)
    args = text_family(hf).hf_to_megatron(text)
    return {**args, "position_embedding_type": "mrope", "mrope_section": section}


def megatron_to_hf(args: Any) -> HFConfig:
    """Not derivable from Megatron's arguments (they describe the language model only)."""
    raise UnsupportedConfigError("a Qwen2-VL config.json cannot be rebuilt from Megatron "
                                 "arguments; pass the original model directory as "
                                 "--hf-template")


def image_token_id(hf: HFConfig) -> int:
    """The image placeholder's token id (repeated once per merged patch)."""
    return int(hf.get("image_token_id", 151655))


def _hf_prefixes(names: list[str]) -> dict[str, str]:
    """Where the parts live: transformers 5 nests them under ``model.``."""
    if any(n.startswith("model.language_model.") for n in names):
        return {"lm": "model.language_model.", "vision": "model.visual."}
    return {"lm": "model.", "vision": "visual."}


def _vision_config(hf: HFConfig, lm: TransformerConfig) -> TransformerConfig:
    v = vision(hf)
    return encoder_config(
        lm, num_layers=v["layers"], hidden_size=v["width"], ffn_hidden_size=v["ffn"],
        num_attention_heads=v["heads"], num_query_groups=v["heads"],
        kv_channels=v["width"] // v["heads"],
        normalization="LayerNorm" if v["kind"] == "qwen2_vl" else "RMSNorm",
        layernorm_epsilon=NORM_EPS, add_bias_linear=True, add_qkv_bias=True,
        gated_linear_unit=v["kind"] == "qwen2_5_vl", activation_func=v["act"],
        mrope_section=None, window_size=None)


def language_names(names: list[str]) -> Callable[[str], str]:
    """Where this checkpoint keeps the text family's HF tensors."""
    lm = _hf_prefixes(names)["lm"]

    def lm_name(name: str) -> str:
        return name if name.startswith("lm_head.") else lm + name[len("model."):]

    return lm_name


def vision_rules(hf: HFConfig, lm: TransformerConfig, names: list[str]) -> list[Rule]:
    """The tower's and merger's rules for a checkpoint holding HF tensors ``names``."""
    vis, v = _hf_prefixes(names)["vision"], vision(hf)
    norm_bias = v["kind"] == "qwen2_vl"
    patch_shape = (v["width"], v["channels"], v["temporal_patch"], v["patch"], v["patch"])
    out: list[Rule] = [
        Reshaped("vision_model.patch_embed.weight", vis + "patch_embed.proj.weight",
                 (v["width"], v["channels"] * v["temporal_patch"] * v["patch"] ** 2),
                 patch_shape),
        *vit_layer_rules("vision_model.decoder.layers.*.", vis + "blocks.*.",
                         _vision_config(hf, lm), {**_VIT_NAMES, **_MLP_NAMES[v["kind"]]},
                         norm_bias=norm_bias),
        Direct("vision_projection.ln_q.weight", vis + "merger.ln_q.weight"),
    ]
    if norm_bias:
        out.append(Direct("vision_projection.ln_q.bias", vis + "merger.ln_q.bias"))
    for fc, index in (("linear_fc1", 0), ("linear_fc2", 2)):
        out += [Direct(f"vision_projection.encoder.{fc}.{s}", f"{vis}merger.mlp.{index}.{s}")
                for s in ("weight", "bias")]
    return out


def build(hf: HFConfig, args: argparse.Namespace, lm: TransformerConfig, pre_process: bool,
          post_process: bool, add_encoder: bool, vp_stage: int | None = None,
          transformer_engine: bool | None = None) -> Qwen2VLModel:
    """This stage's model chunk (the vision tower and merger with ``add_encoder``)."""
    v = vision(hf)
    vision_config = _vision_config(hf, lm)
    projection_config = encoder_config(
        lm, ffn_hidden_size=v["width"] * v["merge"] ** 2, add_bias_linear=True,
        gated_linear_unit=False, activation_func=F.gelu, mrope_section=None)
    tower = {"patch_features": v["channels"] * v["temporal_patch"] * v["patch"] ** 2,
             "merge": v["merge"], "rope_theta": v["rope_theta"], "window": v["window"],
             "full_attention_layers": v["full_attention_layers"]}
    return Qwen2VLModel(
        language_config=lm,
        language_spec=text_family(hf).decoder_spec(lm, vp_stage, transformer_engine),
        vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
        vision_config=vision_config,
        vision_spec=bidirectional_layer_spec(vision_config, transformer_engine,
                                             AttnMaskType.arbitrary),
        projection_config=projection_config, tower=tower, image_token_id=image_token_id(hf),
        add_encoder=add_encoder, pre_process=pre_process, post_process=post_process,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        rotary_base=args.rotary_base, vp_stage=vp_stage)


# Merged-patch grids (height, width) of the verification images, by sample: sample 0 one
# image, sample 1 two (text between them), sizes differing so that dynamic resolution,
# per-image attention and (Qwen2.5-VL) partial windows are exercised.
VERIFY_GRIDS = (((3, 4),), ((5, 6), (2, 2)))


def verify_batch(hf: HFConfig, batch_size: int, text_length: int, seed: int = 0):
    """Random images and text for ``verify``: the same batch for Megatron (M-RoPE positions
    from :mod:`.rope_index`) and transformers (which computes its own positions)."""
    v, token = vision(hf), image_token_id(hf)
    generator = torch.Generator().manual_seed(seed)
    vocab = int(_text_config(hf)["vocab_size"])
    grids = [VERIFY_GRIDS[b % len(VERIFY_GRIDS)] for b in range(batch_size)]
    lengths = [sum(h * w for h, w in sample) for sample in grids]
    seq_length = text_length + max(lengths)
    rows, thw = [], []
    for sample, count in zip(grids, lengths):
        ids = torch.randint(0, vocab, (seq_length - count,), generator=generator)
        ids[ids == token] = 0
        ids[ids == hf.get("video_token_id", -1)] = 0
        pieces, at = [], 0
        for h, w in sample:  # each image after two text tokens
            pieces += [ids[at:at + 2], torch.full((h * w,), token)]
            at += 2
            thw.append([1, h * v["merge"], w * v["merge"]])
        rows.append(torch.cat([*pieces, ids[at:]]))
    ids, thw = torch.stack(rows), torch.tensor(thw)
    features = v["channels"] * v["temporal_patch"] * v["patch"] ** 2
    pixels = torch.randn(int(thw.prod(-1).sum()), features, generator=generator)
    megatron = {"input_ids": ids, "pixel_values": pixels, "image_grid_thw": thw,
                "position_ids": rope_index(ids, thw, token, v["merge"])}
    hf_inputs = {"input_ids": ids, "pixel_values": pixels, "image_grid_thw": thw,
                 "mm_token_type_ids": (ids == token).int()}
    return VerifyBatch(megatron=megatron, hf=hf_inputs, seq_length=seq_length)


def training_forward(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch of :class:`~megatron_patch.data.qwen2_vl.Qwen2VLSFTDataset` through the
    model.

    Packed rows run as one sequence of ``micro_batch_size * seq_length`` tokens (the shape the
    training loop's pipeline schedule uses for packed data) in which every document attends
    only to itself."""
    mask = None
    if "cu_seqlens" in batch:
        positions = batch.pop("position_ids").reshape(3, 1, -1)
        batch = flatten_batch_for_packed_sequences(batch)
        batch["position_ids"] = positions
        mask = document_causal_mask(batch["cu_seqlens"][0], 1, positions.shape[-1])
    images = batch["image_grid_thw"].shape[0] > 0
    output = model(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                   pixel_values=batch["pixel_values"] if images else None,
                   image_grid_thw=batch["image_grid_thw"] if images else None,
                   labels=batch["labels"], loss_mask=batch["loss_mask"], attention_mask=mask)
    return output, batch["loss_mask"]


QWEN2_VL = register_family(
    VisionLanguageFamily(
        name="qwen2_vl",
        hf_architectures=("Qwen2VLForConditionalGeneration",
                          "Qwen2_5_VLForConditionalGeneration"),
        hf_to_megatron=hf_to_megatron,
        megatron_to_hf=megatron_to_hf,
        text_family=text_family,
        language_names=language_names,
        vision_rules=vision_rules,
        build=build,
        image_token_id=image_token_id,
        verify_inputs=verify_batch,
        training_forward=training_forward,
        packing=True,
    )
)
