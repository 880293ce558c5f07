"""LoRA dropout with cheap random masks on CPU.

Same maths as nn.Dropout (see tests/test_speed_paths.py); only the cost changes. Profiled on a 2-core
CPU, peft's nn.Dropout spent ~22% of a LoRA step drawing Bernoulli samples (examples/benchmarks/README.md).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

_LOW_WORDS = slice(0, 3) if sys.byteorder == "little" else slice(1, 4)  # the int16 words below an int64's sign bit


class FastDropout(nn.Module):
    """Inverted dropout whose mask comes from 16-bit random integers instead of float Bernoulli draws.

    torch's CPU Bernoulli sampler costs ~8 ns per element; one 64-bit `random_()` draw yields three
    16-bit uniforms, ~10x cheaper per element. The drop probability is rounded to a multiple of 1/65536.
    Uses torch's default generator, so `set_seed` and checkpointed RNG state still reproduce a run.
    """

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability {p} is not in [0, 1)")
        self.p = p
        # A uniform 16-bit value v (as int16, offset by 32768) is dropped when v < threshold.
        self.threshold = round(p * 65536) - 32768

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        n = x.numel()
        # random_() on int64 fills [0, 2**63): the most significant 16 bits are not uniform, so use the other three.
        words = torch.empty((n + 2) // 3, dtype=torch.int64, device=x.device).random_()
        uniform = words.view(torch.int16).view(-1, 4)[:, _LOW_WORDS]
        keep = (uniform >= self.threshold).reshape(-1)[:n].view(x.shape)
        return _MaskedScale.apply(x, keep, 1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _MaskedScale(torch.autograd.Function):
    """x * keep * scale that saves the boolean mask (1 byte per element) for backward, not a float copy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * keep * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return grad * keep * ctx.scale, None, None


def use_fast_dropout(model: nn.Module) -> int:
    """Replaces every nn.Dropout (with p > 0) inside peft's lora_dropout containers by FastDropout.

    Returns:
        How many modules were replaced.
    """
    replaced = 0
    for module in model.modules():
        container = getattr(module, "lora_dropout", None)
        if isinstance(container, nn.ModuleDict):
            for name, child in container.items():
                if type(child) is nn.Dropout and child.p > 0:
                    container[name] = FastDropout(child.p)
                    replaced += 1
    return replaced
