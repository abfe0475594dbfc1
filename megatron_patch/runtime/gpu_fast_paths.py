"""Fast torch-native replacements for the apex/TE kernels Megatron-Core falls back from on GPUs.

Targets megatron-core 0.19.x. Without Transformer Engine or apex, Megatron-Core uses:

- ``local_multi_tensor_l2_norm`` for the gradient norm: one ``torch.norm`` per tensor, each read
  back to the host (a device synchronisation per parameter);
- ``local_multi_tensor_scale``: one kernel pair per tensor for grad clipping and buffer copies;
- ``torch.optim.AdamW`` in its default multi-tensor (foreach) mode.

Here they become single ``torch._foreach_*`` launches with no host round trip, and the Adam
parameter groups switch to torch's fused CUDA kernel (``fused=True``). On Hopper and newer,
:func:`prefer_cudnn_attention` puts cuDNN first among torch SDPA's backends (torch's default
order tries flash first; ``toolkits/benchmark/sdpa_backends.py`` measured cuDNN 1.7x faster for
causal GQA, forward+backward, on an H100). Applied only on CUDA when
neither TE nor apex is installed; ``tests/test_gpu_fast_paths.py`` checks the patched symbols and
the numerics against the upstream implementations on the CPU.

:func:`compile_transformer_layers` (``--no-torch-compile-layers`` to opt out) compiles each
transformer layer, the fusion Transformer Engine's kernels would otherwise provide.

:func:`install_wgrad_accumulation` lets Megatron-Core's ``gradient_accumulation_fusion`` (apex's
``fused_weight_gradient_mlp_cuda``) run on torch: each linear's weight gradient is one cuBLAS GEMM
accumulating in fp32 straight into the gradient buffer (``addmm`` with ``out_dtype``), instead of
a bf16 gradient tensor that the data-parallel hook then adds to the buffer.
"""

from __future__ import annotations

import torch

from megatron_patch.runtime.backends import available_backends


def foreach_l2_norm(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: list[list],
                    per_tensor: bool, *args) -> tuple[torch.Tensor, None]:
    """Drop-in for ``amp_C.multi_tensor_l2norm``: the global L2 norm, kept on the device."""
    tensors = tensor_lists[0]
    if not tensors:
        return torch.zeros(1, dtype=torch.float, device=noop_flag.device), None
    norms = torch._foreach_norm(tensors)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    return total.reshape(1), None


def foreach_scale(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: list[list],
                  scale: float | torch.Tensor) -> None:
    """Drop-in for ``amp_C.multi_tensor_scale``: ``dst = src * scale`` for each pair."""
    sources, destinations = tensor_lists[0], tensor_lists[1]
    if not sources:
        return
    if all(s is d for s, d in zip(sources, destinations)):
        torch._foreach_mul_(destinations, scale)
    else:
        torch._foreach_copy_(destinations, torch._foreach_mul(sources, scale))


def prefer_cudnn_attention() -> list[int]:
    """Make cuDNN the first SDPA backend tried (others keep their order); returns the old order.

    torch exposes the priority only through ``sdpa_kernel(..., set_priority=True)``, a context
    manager; the process-wide setting it wraps is used here so compiled layers see it too.
    """
    from torch.nn.attention import SDPBackend

    previous = list(torch._C._get_sdp_priority_order())
    cudnn = int(SDPBackend.CUDNN_ATTENTION)
    torch._C._set_sdp_priority_order([cudnn, *(b for b in previous if b != cudnn)])
    return previous


class TorchWgradAccumulation:
    """Drop-in for apex's ``fused_weight_gradient_mlp_cuda``: ``main_grad += grad_output^T input``.

    ``input`` is ``[tokens, in]``, ``grad_output`` ``[tokens, out]`` and ``main_grad``
    ``[out, in]``, as Megatron-Core's linear backward passes them.
    """

    @staticmethod
    def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor,
                              main_grad: torch.Tensor) -> None:
        """Accumulate into an fp32 buffer (bf16/fp16 operands: fp32 output of one GEMM)."""
        if grad_output.dtype == main_grad.dtype:
            main_grad.addmm_(grad_output.t(), total_input)
        elif main_grad.is_cuda:
            torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=main_grad.dtype,
                        out=main_grad)
        else:  # no mixed-precision GEMM on the CPU
            main_grad.add_(grad_output.t().matmul(total_input))

    @staticmethod
    def wgrad_gemm_accum_fp16(total_input: torch.Tensor, grad_output: torch.Tensor,
                              main_grad: torch.Tensor) -> None:
        """Accumulate into a buffer of the operands' own 16-bit dtype."""
        main_grad.addmm_(grad_output.t(), total_input)


def _mixed_precision_addmm() -> bool:
    """torch has ``addmm(..., out_dtype=)`` (bf16 operands, fp32 accumulator) for CUDA."""
    return "dtype_out" in torch.ops.aten.addmm.overloads()


def install_wgrad_accumulation(force: bool = False) -> bool:
    """Provide Megatron-Core's gradient-accumulation-fusion kernel where apex does not.

    Returns whether ``gradient_accumulation_fusion`` can be on: True with apex (its kernel), or
    after installing :class:`TorchWgradAccumulation` on a CUDA machine (``force`` installs it on
    the CPU too, for tests). Transformer Engine's linears fuse the accumulation themselves, but
    Megatron's own ``ColumnParallelLinear`` (the output layer, and every linear of a
    torch-native model) still needs apex's kernel, so TE alone does not make it available.
    """
    from megatron.core.tensor_parallel import layers

    backends = available_backends()
    if backends.apex:
        return True
    if not (force or (backends.cuda and _mixed_precision_addmm())):
        return False
    if not layers._grad_accum_fusion_available:
        layers.fused_weight_gradient_mlp_cuda = TorchWgradAccumulation
        layers._grad_accum_fusion_available = True
    return True


_PATCHED = False


def apply_gpu_fast_paths() -> bool:
    """Install the foreach kernels in Megatron-Core's fallbacks; returns whether active."""
    global _PATCHED
    backends = available_backends()
    if not backends.cuda or backends.transformer_engine or backends.apex:
        return False
    if not _PATCHED:
        from megatron.core.optimizer import clip_grads, optimizer

        clip_grads.l2_norm_impl = foreach_l2_norm
        clip_grads.multi_tensor_scale_impl = foreach_scale
        optimizer.multi_tensor_scale_impl = foreach_scale
        if torch.cuda.get_device_capability() >= (9, 0):
            prefer_cudnn_attention()
        _PATCHED = True
    return True


def _torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [getattr(o, "optimizer", o) for o in inner if getattr(o, "optimizer", None)]


def use_fused_adam(optimizer) -> int:
    """Switch torch Adam/AdamW groups whose parameters are all on CUDA to the fused kernel.

    Returns the number of parameter groups switched. Megatron-Core builds ``torch.optim.AdamW``
    without ``fused``; the flag is read per step, so setting it on the groups is enough.
    """
    switched = 0
    for torch_optimizer in _torch_optimizers(optimizer):
        if not isinstance(torch_optimizer, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in torch_optimizer.param_groups:
            if group.get("fused") or group.get("capturable"):
                continue
            if all(p.is_cuda and p.is_floating_point() for p in group["params"]):
                group["fused"], group["foreach"] = True, False
                switched += 1
                for param in group["params"]:  # fused kernels keep the step count on device
                    state = torch_optimizer.state.get(param, {})
                    if "step" in state and not state["step"].is_cuda:
                        state["step"] = state["step"].to(param.device, torch.float32)
    return switched


def compile_transformer_layers(model: torch.nn.Module) -> int:
    """``torch.compile`` the forward of every transformer layer of a (wrapped) model chunk.

    Without Transformer Engine the layer's norms, rotary embedding, SwiGLU and residual adds
    are separate kernels; compiled, they fuse around the matmuls. Linears that accumulate their
    weight gradient into ``main_grad`` (gradient-accumulation fusion) stay outside the graph:
    their backward sets attributes on the parameters, which the compiler cannot capture.
    Packed (THD) batches run the layer eagerly: their sequence boundaries change every batch and
    Megatron's THD rotary embedding reads them with ``.item()``, so each batch would recompile.
    A mixture-of-experts MLP runs eagerly too (its experts are grouped GEMMs either way): its
    token dispatcher copies the per-expert token counts to the host on a side stream
    (``record_stream``), which the compiler cannot capture. Returns the layer count.
    """
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.transformer_layer import TransformerLayer

    layers = [m for m in model.modules() if isinstance(m, TransformerLayer)]
    for layer in layers:
        if isinstance(getattr(layer, "mlp", None), MoELayer):
            layer.mlp.forward = torch.compiler.disable(layer.mlp.forward)
        for linear in layer.modules():
            # Megatron's own linear (not one whose forward float8 training replaced)
            if (getattr(linear, "gradient_accumulation_fusion", False)
                    and hasattr(linear, "_forward_impl") and "_forward_impl" not in vars(linear)):
                linear._forward_impl = torch.compiler.disable(linear._forward_impl)
        layer.forward = _compiled_unless_packed(layer.forward)
    return len(layers)


def _compiled_unless_packed(forward):
    """``forward`` compiled, called eagerly for packed-sequence (THD) batches."""
    compiled = torch.compile(forward)

    def dispatch(*args, **kwargs):
        return (forward if kwargs.get("packed_seq_params") is not None else compiled)(
            *args, **kwargs)

    return dispatch
