"""A weighted mean of checkpoints of one model: one checkpoint whose every floating-point tensor is

    w = sum_i f_i * w_i,    sum_i f_i = 1,

the other tensors (integer counters) taken from the first checkpoint. Meant for fine-tunes of one
initialisation, which share a basin of the loss; the mean of unrelated models is noise.

    .venv/bin/python -m experiments.average_weights A.pt B.pt --fractions 0.5 0.5 --out AVERAGED

The config is the first checkpoint's, without what belongs to its own weights (its slice probe,
metrics and step): refit the probe (`experiments.jpeg_encoder_probe --write`) before evaluating.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from lungnlb.checkpoint import load_model, save_checkpoint

OWN_KEYS = ("slice_probe", "metrics", "step", "format", "lungnlb_version")


def average_state_dicts(states: list[dict[str, torch.Tensor]], fractions: list[float]) -> dict[str, torch.Tensor]:
    """The fraction-weighted mean of state dicts with the same keys and shapes."""
    if len(states) != len(fractions) or len(states) < 2:
        raise ValueError(f"need at least two checkpoints and one fraction each, got {len(states)} and {len(fractions)}")
    if not math.isclose(sum(fractions), 1.0, abs_tol=1e-6) or min(fractions) < 0:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions}")
    keys = list(states[0])
    for index, state in enumerate(states[1:], start=1):
        if set(state) != set(keys):
            raise ValueError(f"checkpoint {index} has other tensors than checkpoint 0: "
                             f"{sorted(set(state) ^ set(keys))[:5]}")
    averaged = {}
    for key in keys:
        shapes = {tuple(state[key].shape) for state in states}
        if len(shapes) > 1:
            raise ValueError(f"tensor {key} has different shapes: {sorted(shapes)}")
        first = states[0][key]
        if first.is_floating_point():
            averaged[key] = sum(f * state[key].double() for f, state in zip(fractions, states)).to(first.dtype)
        else:
            averaged[key] = first.clone()
    return averaged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", type=Path, nargs="+")
    parser.add_argument("--fractions", type=float, nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    models, configs = zip(*(load_model(path) for path in args.checkpoints))
    if any(config["model"] != configs[0]["model"] for config in configs):
        raise SystemExit("average_weights: the checkpoints are of different models: "
                         + ", ".join(str(config["model"]) for config in configs))
    model = models[0]
    model.load_state_dict(average_state_dicts([m.state_dict() for m in models], args.fractions))
    config = {key: value for key, value in configs[0].items() if key not in OWN_KEYS}
    config["averaged_from"] = [{"checkpoint": str(path), "fraction": fraction, "step": c.get("step")}
                               for path, fraction, c in zip(args.checkpoints, args.fractions, configs)]
    print(f"wrote {save_checkpoint(args.out, model, config)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
