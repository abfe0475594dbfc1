"""Import every built-in family so that it registers itself."""

from megatron_patch.models import llama, mistral, qwen2, qwen3  # noqa: F401
