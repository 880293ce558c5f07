"""Memory-lean RMSNorm and SwiGLU for training Llama-family blocks: same maths, fewer saved tensors.

transformers' LlamaRMSNorm upcasts its input to fp32 and autograd keeps that copy (4 bytes per element);
its MLP keeps gate, silu(gate), up and their product. The autograd functions below keep the input in
its own dtype plus one fp32 scale per token (RMSNorm), and only gate and up (SwiGLU), recomputing the rest
in backward from those: ~16% fewer activation bytes per token in bf16 (tests/test_speed_paths.py checks
values and gradients against the originals; examples/benchmarks/README.md has the measurements).

Only the exact module classes whose forward is known are patched, per instance, on the model being
trained; anything else keeps its own forward.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}  # weight * x / rms(x), fp32 inside
_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}  # down(act(gate(x)) * up(x))


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        x32 = x.float()
        normed = x32 * rstd
        g = (grad * weight).float()  # d/d(normed), through the cast back to x.dtype (identity for the gradient)
        grad_x = rstd * (g - normed * (g * normed).mean(-1, keepdim=True))
        grad_w = (grad * normed.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return grad_x.to(x.dtype), grad_w, None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        gate32, grad32 = gate.float(), grad.float()  # in fp32: 1 - sigmoid loses all precision in bf16 near 1
        sig = torch.sigmoid(gate32)
        grad_gate = grad32 * up.float() * (sig * (1 + gate32 * (1 - sig)))
        silu = (gate32 * sig).to(gate.dtype)  # as the forward rounded it
        return grad_gate.to(gate.dtype), grad * silu


def _norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return self._llamatune_original_forward(hidden_states)
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return self._llamatune_original_forward(x)
    return self.down_proj(_SwiGLU.apply(self.gate_proj(x), self.up_proj(x)))


def use_lean_blocks(model: nn.Module) -> int:
    """Patches the RMSNorm and SwiGLU MLP instances of a Llama-family model for training.

    Returns:
        How many modules were patched.
    """
    patched = 0
    for module in model.modules():
        name = type(module).__name__
        if name in _NORMS and hasattr(module, "variance_epsilon"):
            forward = _norm_forward
        elif name in _MLPS and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation"):
            forward = _mlp_forward
        else:
            continue
        if not hasattr(module, "_llamatune_original_forward"):
            module._llamatune_original_forward = module.forward
            module.forward = types.MethodType(forward, module)
            patched += 1
    return patched
