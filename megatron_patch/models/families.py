"""Import every built-in family so that it registers itself."""

from megatron_patch.models import llama  # noqa: F401
