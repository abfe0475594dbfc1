"""The Megatron model a checkpoint holds, built on the meta device (no memory, no initialisation).

Conversion never materialises a model: the layout model (TP=1, PP=1, torch-native layer spec)
gives the parameter names the weight rules refer to, their shapes and tensor-parallel attributes,
and the ``sharded_state_dict`` that defines ``torch_dist`` keys. Those keys are the same for
the Transformer Engine spec, so a checkpoint written from the layout loads on either.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import io
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_patch.arguments import parse_training_args
from megatron_patch.conversion.engine import ConversionError, Vocab, WeightMap
from megatron_patch.models.builder import build_gpt_model, transformer_config_from_args
from megatron_patch.models.registry import ModelFamily, get_family
from megatron_patch.parallel_layout import TRAINING, ParallelLayout, Wording
from megatron_patch.runtime.cpu_compat import apply_cpu_compat

EMBEDDING = "embedding.word_embeddings.weight"
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
# Parameters outside the decoder layers live on the first (embedding) or last pipeline stage.
PRE_PROCESS_PREFIXES = ("embedding.",)
POST_PROCESS_PREFIXES = ("decoder.final_layernorm.", "output_layer.")
# What a converted checkpoint's args say about its layout (Megatron argument names).
LAYOUT_ARGS = ("tensor_model_parallel_size", "pipeline_model_parallel_size",
               "virtual_pipeline_model_parallel_size", "num_virtual_stages_per_pipeline_rank",
               "num_layers_per_virtual_pipeline_stage", "decoder_first_pipeline_num_layers",
               "decoder_last_pipeline_num_layers", "expert_model_parallel_size",
               "expert_tensor_parallel_size")
# A routed expert's parameters (SequentialMLP): ``...mlp.experts.local_experts.<expert>.<rest>``.
_EXPERT = re.compile(r"^(.*\.experts\.local_experts\.)(\d+)(\..*)$")


def parse_megatron_args(argv: Sequence[str],
                        defaults: dict | None = None) -> argparse.Namespace:
    """Megatron + megatron-patch arguments exactly as training parses them, without the log.

    ``defaults`` are passed on to :func:`parse_training_args`.
    """
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return parse_training_args(list(argv), defaults)


# The converter's names of the layout's sizes (``convert hf-to-mcore`` flags) and model fields.
CONVERT_WORDING = Wording(
    {"tp": "--tp", "pp": "--pp", "vpp": "--vpp", "ep": "--ep", "etp": "--etp",
     "expert_tp": "expert tensor parallel size",  # --etp, default --tp
     "uneven": "--decoder-first/last-pipeline-num-layers"},
    {"num_experts": "the {} routed experts (config.json num_experts / num_local_experts / "
                    "n_routed_experts)",
     "moe_ffn_hidden_size": "the expert FFN size moe_ffn_hidden_size={}"},
    model="this one")


def check_parallel_layout(model: dict, layout: ParallelLayout,
                          ckpt_format: str = "torch_dist") -> None:
    """Refuse a layout Megatron cannot run the model (Megatron argument values) at, or a
    setting without effect (:class:`~megatron_patch.parallel_layout.ParallelLayout`'s rules,
    in the converter's flags); legacy checkpoints also split experts over the TP ranks."""
    problems = [p for p in layout.problems(model) if p.kind != TRAINING]
    if problems:
        raise ConversionError(problems[0].message(CONVERT_WORDING))
    if ckpt_format == "legacy" and layout.expert_tp != layout.tp:
        raise ConversionError(f"--etp {layout.etp} differs from --tp {layout.tp}: legacy "
                              "checkpoints split experts over the tensor-parallel ranks; use "
                              "--format torch_dist (it loads at any TP/EP/ETP)")


def layer_index(name: str) -> int | None:
    """Global decoder-layer index of a (TP=1, PP=1) Megatron name, None outside the layers."""
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def with_layer(name: str, layer: int) -> str:
    """``name`` with its decoder-layer index replaced by ``layer``."""
    return _LAYER.sub(lambda m: f"decoder.layers.{layer}.{m.group(2)}", name)


def expert_index(name: str) -> int | None:
    """Expert index of a routed expert's parameter name, None for every other parameter."""
    match = _EXPERT.match(name)
    return int(match.group(2)) if match else None


def with_expert(name: str, expert: int) -> str:
    """A routed expert's parameter ``name`` with its expert index replaced by ``expert``."""
    return _EXPERT.sub(lambda m: f"{m.group(1)}{expert}{m.group(3)}", name)


@dataclass
class MegatronLayout:
    """A family's Megatron model (TP=1, PP=1, meta device) and the args it was built from."""

    family: ModelFamily
    args: argparse.Namespace
    config: TransformerConfig
    model: GPTModel

    @property
    def tied(self) -> bool:
        """Whether the output layer shares the embedding weight."""
        return not self.args.untie_embeddings_and_output_weights

    @functools.cached_property
    def parameters(self) -> dict[str, torch.nn.Parameter]:
        """Parameter name -> meta parameter (shape, dtype, tensor-parallel attributes).

        Persistent buffers that are model weights (the MoE router's ``expert_bias``) are
        included: checkpoints hold them like parameters.
        """
        state = self.model.state_dict(keep_vars=True)
        buffers = {name: buffer for name, buffer in self.model.named_buffers() if name in state}
        return {**dict(self.model.named_parameters()), **buffers}

    def weight_map(self, hf_vocab_rows: int) -> WeightMap:
        """The family's HF <-> Megatron rules resolved against this model's parameters."""
        shapes = {name: param.shape for name, param in self.parameters.items()}
        rules = self.family.weight_mappings(self.config, self.tied)
        return WeightMap(rules, shapes, self.config,
                         Vocab(hf_rows=hf_vocab_rows, padded=self.args.padded_vocab_size))

    def groups(self) -> list[list[str]]:
        """Parameter names in streaming order: pre-process, one group per layer, post-process."""
        layers: dict[int, list[str]] = {}
        pre, post = [], []
        for name in self.parameters:
            layer = layer_index(name)
            if layer is not None:
                layers.setdefault(layer, []).append(name)
            elif name.startswith(PRE_PROCESS_PREFIXES):
                pre.append(name)
            elif name.startswith(POST_PROCESS_PREFIXES):
                post.append(name)
            else:
                raise ConversionError(f"cannot place Megatron parameter {name!r} in a stage")
        return [g for g in [pre, *(layers[i] for i in sorted(layers)), post] if g]


def hf_embedding_name(family: ModelFamily, config: TransformerConfig) -> str:
    """The HF tensor holding the input embedding (its rows size the vocabulary)."""
    rule = next(r for r in family.weight_mappings(config, True) if r.megatron == EMBEDDING)
    return rule.hf_names(None)[0]


def single_stage_args(args: argparse.Namespace, family: ModelFamily) -> argparse.Namespace:
    """A copy of checkpoint ``args`` for the TP=1, PP=1 layout model of ``family``."""
    args = copy.copy(args)
    for name in LAYOUT_ARGS:
        setattr(args, name, None)
    args.tensor_model_parallel_size = args.pipeline_model_parallel_size = 1
    args.expert_model_parallel_size = args.expert_tensor_parallel_size = 1
    args.sequence_parallel = False
    args.model_family = family.name
    return args


def build_layout(args: argparse.Namespace, family: ModelFamily, dtype: torch.dtype
                 ) -> MegatronLayout:
    """Build the layout model on the meta device (needs an initialised TP=1, PP=1 state)."""
    config = transformer_config_from_args(args)
    config = dataclasses.replace(config, params_dtype=dtype, perform_initialization=False,
                                 use_cpu_initialization=True)
    with torch.device("meta"):
        model = build_gpt_model(args, config, transformer_engine=False)
    return MegatronLayout(family=family, args=args, config=config, model=model)


def family_of(args: argparse.Namespace) -> ModelFamily:
    """The registered family named by ``args.model_family``."""
    if not getattr(args, "model_family", None):
        raise ConversionError("the checkpoint's args name no model family; pass the original "
                              "HF model directory as the template (--hf-template)")
    return get_family(args.model_family)


@contextlib.contextmanager
def single_process_group(scratch: Path) -> Iterator[None]:
    """A one-process gloo world with Megatron's TP=1, PP=1 state, torn down afterwards.

    Without a GPU the CPU runtime is applied first: building a layout model constructs modules
    that make CUDA streams (MoE's alltoall dispatcher, MLA), and a checkpoint's own args are
    read without :func:`parse_training_args`, which applies it for training.
    """
    apply_cpu_compat()
    if torch.distributed.is_initialized():
        if torch.distributed.get_world_size() != 1:
            raise ConversionError("checkpoint conversion runs in a single process, not torchrun")
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel()
        yield
        return
    store = Path(scratch) / f".pg-{os.getpid()}"
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=0,
                                         world_size=1)
    try:
        parallel_state.initialize_model_parallel()
        yield
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()
        store.unlink(missing_ok=True)


@dataclass(frozen=True)
class Chunk:
    """One model chunk of a pipeline layout: pipeline rank, virtual stage and its layers."""

    pp_rank: int
    vp_stage: int | None
    first_layer: int
    num_layers: int
    pre_process: bool
    post_process: bool

    @property
    def key(self) -> str:
        """The chunk's state-dict key in a legacy checkpoint (``model`` or ``model<vp>``)."""
        return "model" if self.vp_stage is None else f"model{self.vp_stage}"


def pipeline_chunks(config: TransformerConfig, pp: int, vpp: int | None,
                    first: int | None, last: int | None) -> list[Chunk]:
    """Megatron's assignment of layers to pipeline ranks and virtual stages."""
    config = dataclasses.replace(
        config, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
        num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last,
        pipeline_dtype=config.params_dtype,
    )
    stages = range(vpp) if vpp else [None]
    chunks = []
    for rank in range(pp):
        for stage in stages:
            chunks.append(Chunk(
                pp_rank=rank, vp_stage=stage,
                first_layer=get_transformer_layer_offset(config, vp_stage=stage, pp_rank=rank),
                num_layers=get_num_layers_to_build(config, vp_stage=stage, pp_rank=rank),
                pre_process=rank == 0 and stage in (None, 0),
                post_process=rank == pp - 1 and stage in (None, (vpp or 1) - 1),
            ))
    covered = sorted(i for c in chunks for i in range(c.first_layer, c.first_layer + c.num_layers))
    if covered != list(range(config.num_layers)):
        raise ConversionError(f"pipeline layout pp={pp} vpp={vpp} first={first} last={last} does "
                              f"not cover the {config.num_layers} layers exactly once")
    return chunks
