"""The CPU inference form of a trained network: one explicit conversion, `inference_form(model)`.

Training and inference compute the same function; without autograd, inference can compute it
faster (`python -m benchmarks.speed` measures it):

- instance norm on the group-norm kernel (`FastInstanceNorm2d`; its backward would lose precision
  for channels with a large mean, so it is for inference only);
- the U-Net's input, and so every convolution, pooling and block after it, in channels_last (NHWC)
  layout, where oneDNN's 3x3 convolutions and max pooling are faster on CPU;
- each non-local block's value and output projections fused into one product, (W W_v) O + W b_v;
- on a CPU that computes bfloat16 in hardware (AVX512-BF16 or AMX), the forward pass under
  bfloat16 autocast (`inference_precision`): oneDNN's bfloat16 convolutions run faster there, and
  the mask probabilities move by about 1e-4 (`benchmarks/inference_speed.py` measures the gain, its
  tests the difference). Elsewhere bfloat16 is emulated, slower than float32, and not used.

`inference_form` returns a converted copy in eval mode with gradients off, so the model it was
given (e.g. one being trained and validated) is untouched. Parameters and state_dict keys are the
same in both forms, so a checkpoint loads into either. `Predictor` serves the inference form; the
training engine and the TorchScript export use the plain one.
"""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager

import torch
from torch import nn

from .instance_norm import use_fast_instance_norm


def inference_form(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for inference only: eval mode, no gradients, the fast forms above."""
    converted = use_fast_instance_norm(copy.deepcopy(model).eval().requires_grad_(False))
    for module in converted.modules():
        if hasattr(module, "fast_inference"):
            module.fast_inference = True
    return converted


PRECISIONS = ("auto", "float32", "bfloat16")


def cpu_has_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX tiles)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def inference_precision(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The dtype a forward pass on ``device`` computes in: ``precision`` "auto" is bfloat16 on a
    CPU with bfloat16 in hardware and float32 otherwise (on a GPU too: no GPU run has measured it)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return torch.bfloat16 if device.type == "cpu" and cpu_has_bfloat16() else torch.float32
    return torch.bfloat16 if precision == "bfloat16" else torch.float32


def autocast_to(device: torch.device, dtype: torch.dtype) -> AbstractContextManager:
    """Autocast to ``dtype`` on ``device`` (nothing for float32); autocast is per thread, so each
    thread that runs a forward pass enters it."""
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)
