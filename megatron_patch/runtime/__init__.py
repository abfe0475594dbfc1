"""Device/backend selection and the CPU compatibility layer for Megatron-Core."""

from megatron_patch.runtime.backends import Backends, available_backends
from megatron_patch.runtime.cpu_compat import apply_cpu_compat, cpu_compat_active

__all__ = ["Backends", "apply_cpu_compat", "available_backends", "cpu_compat_active"]
