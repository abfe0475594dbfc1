"""Baichuan / Baichuan2 sizes; the 13B models (ALiBi) have ``model_max_length`` instead of
``max_position_embeddings``."""

from __future__ import annotations

from typing import Any

from megatron_patch.models.common.sizes import ModelSize, decoder_config


def _baichuan(architecture: str, hidden: int, layers: int, ffn: int, vocab: int,
              **extra: Any) -> dict[str, Any]:
    return decoder_config(architecture, "baichuan", hidden, layers, hidden // 128, hidden // 128,
                          ffn, **{"vocab_size": vocab, "rms_norm_eps": 1e-6,
                                  "tie_word_embeddings": False, **extra})


BAICHUAN_SIZES = (
    ModelSize("baichuan-tiny", "tiny", _baichuan("BaichuanForCausalLM", 256, 4, 688, 2048,
                                                 max_position_embeddings=2048, z_loss_weight=0)),
    ModelSize("baichuan-7b", "7B", _baichuan("BaiChuanForCausalLM", 4096, 32, 11008, 64000,
                                             max_position_embeddings=4096)),
    ModelSize("baichuan-13b", "13B", _baichuan("BaichuanForCausalLM", 5120, 40, 13696, 64000,
                                               model_max_length=4096)),
    ModelSize("baichuan2-7b", "baichuan2-7B", _baichuan(
        "BaichuanForCausalLM", 4096, 32, 11008, 125696, max_position_embeddings=4096,
        z_loss_weight=0)),
    ModelSize("baichuan2-13b", "baichuan2-13B", _baichuan(
        "BaichuanForCausalLM", 5120, 40, 13696, 125696, model_max_length=4096,
        z_loss_weight=0)),
)
