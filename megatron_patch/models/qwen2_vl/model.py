"""The Qwen2-VL / Qwen2.5-VL model chunk: vision tower + patch merger + M-RoPE language model.

    model(input_ids=tokens, position_ids=pos3, pixel_values=pv, image_grid_thw=thw,
          labels=labels, loss_mask=loss_mask, attention_mask=None)

- ``input_ids [B, S]`` already hold ``image_token_id`` once per merged patch (as transformers'
  processor writes them); the merger's outputs replace those tokens' embeddings in order
  (row 0's images first). A count mismatch raises ``ValueError``.
- ``position_ids [3, B, S]``: M-RoPE (temporal, height, width) positions
  (:mod:`.rope_index`), needed on every pipeline stage.
- ``pixel_values [N_patches, C*T*P*P]`` and ``image_grid_thw [n_images, 3]``: the processor's
  patches of all images of the micro-batch, or None for text only; read on the first stage.
- ``attention_mask``: optional ``[B, 1, S, S]`` bool, True where attention is forbidden (e.g.
  :func:`megatron_patch.models.common.packed_seq.document_causal_mask` for packed
  documents, whose positions restart); None is causal attention over the row.
- Returns Megatron's per-token loss ``[B, S]`` with ``labels`` (``loss_mask`` is for the caller,
  as with ``GPTModel``), else the logits ``[B, S, vocab / TP]``; hidden states off the last
  pipeline stage.

The vision tower and merger live on the first pipeline stage (``add_encoder``); the parts are
``vision_model``, ``vision_projection`` (the merger) and ``language_model`` (a ``GPTModel`` with
``position_embedding_type="mrope"``), frozen by :meth:`freeze`.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_patch.models.common.gpt_model import PatchGPTModel
from megatron_patch.models.qwen2_vl.tower import PatchMerger, Qwen2VisionTower


class Qwen2VLModel(MegatronModule):
    """One pipeline chunk of a Qwen2-VL / Qwen2.5-VL model (see the module docstring)."""

    def __init__(self, *, language_config: TransformerConfig, language_spec: ModuleSpec,
                 vocab_size: int, max_sequence_length: int, vision_config: TransformerConfig,
                 vision_spec: ModuleSpec, projection_config: TransformerConfig,
                 tower: dict, image_token_id: int, add_encoder: bool, pre_process: bool,
                 post_process: bool, share_embeddings_and_output_weights: bool,
                 rotary_base: float, vp_stage: int | None = None):
        super().__init__(config=language_config)
        if language_config.context_parallel_size > 1:
            raise ValueError("context parallelism is not supported for Qwen2-VL / Qwen2.5-VL; "
                             "set --context-parallel-size 1")
        self.pre_process, self.post_process = pre_process, post_process
        self.add_encoder = add_encoder
        self.image_token_id = image_token_id
        self.share_embeddings_and_output_weights = share_embeddings_and_output_weights
        self.language_model = PatchGPTModel(
            config=language_config, transformer_layer_spec=language_spec,
            vocab_size=vocab_size, max_sequence_length=max_sequence_length,
            pre_process=pre_process, post_process=post_process, parallel_output=True,
            share_embeddings_and_output_weights=share_embeddings_and_output_weights,
            position_embedding_type="mrope", rotary_base=rotary_base,
            scatter_embedding_sequence_parallel=False, vp_stage=vp_stage)
        self.vision_model = self.vision_projection = None
        if add_encoder:
            self.vision_model = Qwen2VisionTower(vision_config, vision_spec, **tower,
                                                 vp_stage=vp_stage)
            self.vision_projection = PatchMerger(projection_config, vision_config,
                                                 tower["merge"])

    def shared_embedding_or_output_weight(self) -> torch.Tensor | None:
        """The language model's tied embedding/output weight (for Megatron's gradient sync)."""
        return self.language_model.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor: torch.Tensor | list | None) -> None:
        """The previous pipeline stage's hidden states (the language model's input)."""
        if isinstance(input_tensor, list):
            if len(input_tensor) != 1:
                raise ValueError(f"expected one input tensor, got {len(input_tensor)}")
            input_tensor = input_tensor[0]
        self.language_model.set_input_tensor(input_tensor)

    def freeze(self, freeze_language_model: bool, freeze_vision_model: bool,
               freeze_vision_projection: bool) -> None:
        """Stop the gradients of the named parts (those present on this stage)."""
        parts = [(freeze_language_model, self.language_model),
                 (freeze_vision_model, self.vision_model),
                 (freeze_vision_projection, self.vision_projection)]
        for frozen, module in parts:
            if frozen and module is not None:
                for param in module.parameters():
                    param.requires_grad = False

    def image_embeddings(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor
                         ) -> torch.Tensor:
        """``[N_patches / merge**2, hidden]`` merged-patch embeddings of the images, in order."""
        return self.vision_projection(self.vision_model(pixel_values, image_grid_thw))

    def _embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
               image_grid_thw: torch.Tensor | None) -> torch.Tensor:
        """``[S, B, hidden]`` token embeddings with the images' in place of their tokens."""
        embeddings = self.language_model.embedding(input_ids=input_ids, position_ids=None)
        image = input_ids == self.image_token_id
        count = int(image.sum())
        images = None
        if pixel_values is not None:
            if image_grid_thw is None:
                raise ValueError("pixel_values without image_grid_thw")
            images = self.image_embeddings(pixel_values, image_grid_thw)
        given = 0 if images is None else images.shape[0]
        if count != given:
            raise ValueError(f"input_ids hold {count} image tokens (id {self.image_token_id}) "
                             f"but the images give {given} embeddings (image_grid_thw "
                             f"{None if image_grid_thw is None else image_grid_thw.tolist()})")
        if count:  # HF order: batch-major, then sequence
            rows = embeddings.transpose(0, 1).masked_scatter(image.unsqueeze(-1),
                                                             images.to(embeddings.dtype))
            embeddings = rows.transpose(0, 1).contiguous()
        if self.config.sequence_parallel:
            embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings)
        return embeddings

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Loss ``[B, S]`` with ``labels``, else logits (see the module docstring)."""
        if position_ids.dim() != 3 or position_ids.shape[0] != 3:
            raise ValueError(f"position_ids must be [3, B, S] M-RoPE positions, got "
                             f"{tuple(position_ids.shape)}")
        decoder_input = None
        if self.pre_process:
            if not self.add_encoder and pixel_values is not None:
                raise ValueError("this pipeline stage has no vision tower")
            decoder_input = self._embed(input_ids, pixel_values, image_grid_thw)
        return self.language_model(input_ids=None, position_ids=position_ids,
                                   attention_mask=attention_mask, decoder_input=decoder_input,
                                   labels=labels, loss_mask=loss_mask)
