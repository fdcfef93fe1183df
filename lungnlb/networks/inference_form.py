"""The CPU inference form of a trained network: one explicit conversion, `inference_form(model)`.

Training and inference compute the same function; without autograd, inference can compute it
faster (`python -m benchmarks.speed` measures it):

- instance norm on the group-norm kernel (`FastInstanceNorm2d`; its backward would lose precision
  for channels with a large mean, so it is for inference only);
- the U-Net's input, and so every convolution, pooling and block after it, in channels_last (NHWC)
  layout, where oneDNN's 3x3 convolutions and max pooling are faster on CPU;
- each non-local block's value and output projections fused into one product, (W W_v) O + W b_v.

`inference_form` returns a converted copy in eval mode with gradients off, so the model it was
given (e.g. one being trained and validated) is untouched. Parameters and state_dict keys are the
same in both forms, so a checkpoint loads into either. `Predictor` serves the inference form; the
training engine and the TorchScript export use the plain one.
"""

from __future__ import annotations

import copy

from torch import nn

from .instance_norm import use_fast_instance_norm


def inference_form(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for inference only: eval mode, no gradients, the fast forms above."""
    converted = use_fast_instance_norm(copy.deepcopy(model).eval().requires_grad_(False))
    for module in converted.modules():
        if hasattr(module, "fast_inference"):
            module.fast_inference = True
    return converted
