"""Instance normalisation computed by torch's group-norm kernel (one group per channel).

For x of shape (B, C, H, W), per sample b and channel c over the H x W pixels:

    y[b, c] = (x[b, c] - mean) / sqrt(var + eps) * weight[c] + bias[c]      (biased variance)

which is exactly group normalisation with C groups. `torch.instance_norm` reshapes to
(1, B*C, H, W) and runs batch norm, which on CPU is markedly slower than the group-norm kernel
(`benchmarks/speed.py` measures the whole model).
`FastInstanceNorm2d` has the same parameters and state_dict keys as `nn.InstanceNorm2d`, so
checkpoints load either way; outputs agree to float32 rounding (max error ~1e-6 against a
float64 reference, the same as `torch.instance_norm`).

Both memory formats are served in their own layout. NCHW input runs the NCHW group-norm kernel.
channels_last input runs the channels_last group-norm kernel, which accumulates a one-pass
float32 variance (sum of squares minus squared sum): off by 1e-3 for a channel mean of 3
standard deviations and by 2 for one of 200 (torch 2.14). Instance norm does not change when a
per-channel constant is subtracted, so the input is first centred on the mean of a strided
subsample (about 1024 pixels per channel): the remaining mean is then small against the spread
of the values and the one-pass variance is exact to float32 rounding again. Centring costs
one pass over the tensor, copying to NCHW and back would cost two.

Inference only (installed by `lungnlb.networks.inference_form`): the group-norm backward loses
precision in the same way for channels with a large mean (weight gradients off by ~1e-3 relative
in a BasicUNet, against ~1e-6 for instance norm), so a forward that records gradients is refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks.pointwise import is_channels_last


class FastInstanceNorm2d(nn.InstanceNorm2d):
    """`nn.InstanceNorm2d` without running statistics, evaluated with `F.group_norm` (inference only)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            raise RuntimeError("FastInstanceNorm2d is for inference only (its backward is imprecise); "
                               "train the plain model, not its inference_form")
        if x.dim() != 4:
            raise ValueError(f"FastInstanceNorm2d expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
        if is_channels_last(x):
            x = x - subsample_mean(x)  # keeps channels_last; see the module docstring
        else:
            x = x.contiguous()
        return F.group_norm(x, self.num_features, self.weight, self.bias, self.eps)


def subsample_mean(x: torch.Tensor, pixels: int = 1024) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, 1, 1): per-channel mean over a regular grid of about `pixels` pixels."""
    stride = max(1, int((x.shape[-2] * x.shape[-1] / pixels) ** 0.5))
    return x[:, :, ::stride, ::stride].mean(dim=(2, 3), keepdim=True)


def use_fast_instance_norm(module: nn.Module) -> nn.Module:
    """Replace every `nn.InstanceNorm2d` without running statistics in `module` (in place) by
    a `FastInstanceNorm2d` holding the same parameter tensors; returns `module`."""
    for name, child in list(module.named_modules()):
        if type(child) is nn.InstanceNorm2d and not child.track_running_stats:
            fast = FastInstanceNorm2d(child.num_features, child.eps, child.momentum, child.affine)
            fast.weight, fast.bias = child.weight, child.bias
            module.set_submodule(name, fast)
    return module
