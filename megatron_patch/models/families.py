"""Import every built-in family so that it registers itself."""

from megatron_patch.models import (  # noqa: F401
    baichuan,
    bloom,
    deepseek,
    falcon,
    glm,
    llama,
    llava,
    mistral,
    mixtral,
    opt,
    qwen2,
    qwen2_moe,
    qwen2_vl,
    qwen3,
    qwen3_moe,
    starcoder,
)
