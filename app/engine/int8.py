"""Int8 linear layers whose activations are quantized per token, so a token's numbers never depend on its batch.

fbgemm's dynamic int8 matrix product (``quantized::linear_dynamic``) is the fastest int8 kernel
torch has on these CPUs (measured on a 2-core EPYC, 49152x576 lm_head at one token: 1.8 ms,
against 3.0 ms for onednn's qlinear, 4.1 ms for ``_int_mm`` and 45-78 ms for inductor's compiled
weight-only int8). It quantizes the activations with one scale for the whole input, though:
every token of a batch, of a prompt block or of a speculative draft shares the range of the
largest one. Measured on random rows whose magnitudes differ tenfold, that costs the small rows
up to 92% relative error (1.4-1.8% with a scale per token), and it makes a token's logits depend
on the other rows of its forward, so a greedy answer changed with the batch it ran in and with
speculation (0 of 8 real prompts kept their answer once drafts were verified).

Here each token's row is divided by its own largest magnitude and two guard columns (+1 and -1,
multiplied by zero weights) pin the kernel's per-tensor range to [-1, 1] whatever the batch:
the quantized values of a row, the integer products and so the row's output depend on that row
alone. The cost is a few small operations per layer (about 15 us at one token).
"""
from __future__ import annotations

import warnings

import torch

# fbgemm's u8 x s8 products are summed in pairs in 16 bits; 7-bit activations keep the pairs from saturating.
REDUCE_RANGE = True


def per_token_input(x: torch.Tensor, guard: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's input: each row divided by its largest magnitude, then the guard columns; and those scales."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_(min=torch.finfo(torch.float32).tiny)
    return torch.cat([x / scale, guard.expand(*x.shape[:-1], 2)], dim=-1), scale


class Int8Linear(torch.nn.Module):
    """A Linear with int8 weights (a scale per output channel) and int8 activations (a scale per token)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        guarded = torch.nn.Linear(self.in_features + 2, self.out_features, bias=False)
        guarded.weight.data = torch.cat([weight, weight.new_zeros(self.out_features, 2)], dim=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
            packed = quantize_dynamic(torch.nn.Sequential(guarded), {torch.nn.Linear: per_channel_dynamic_qconfig})
        self._packed = packed[0]._packed_params._packed_params
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().float(),
                                                                        requires_grad=False)
        self.register_buffer("guard", torch.tensor([1.0, -1.0]), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ weight.T + bias`` with both sides in int8."""
        guarded, scale = per_token_input(x, self.guard)
        out = torch.ops.quantized.linear_dynamic(guarded, self._packed, REDUCE_RANGE).mul_(scale)
        return out if self.bias is None else out.add_(self.bias)

    def weight_bytes(self) -> int:
        """Bytes one forward reads of this layer's weights: int8 values, and a float scale and zero point per row."""
        weight = self._packed.unpack()[0]
        return weight.numel() + weight.q_per_channel_scales().numel() * 8 + (
            0 if self.bias is None else self.bias.numel() * 4)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every Linear layer of ``model`` (in place) by an :class:`Int8Linear`."""
    for name, child in list(model.named_children()):
        if isinstance(child, torch.nn.Linear):
            setattr(model, name, Int8Linear(child))
        else:
            quantize_int8(child)
    return model
