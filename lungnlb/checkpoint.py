"""Checkpoints: a model's weights as a plain `state_dict` plus a JSON config beside them.

A checkpoint named `run/best` is two files, each written atomically (temporary file in the same
folder, then `os.replace`), so a reader never sees half a file. The config is replaced first and
the weights last: a reader that reloads when the `.pt` changes (the MONAI Label app) finds the
matching config already in place.

    run/best.pt     state_dict (tensors only), loadable with `torch.load(..., weights_only=True)`
    run/best.json   config: everything needed to rebuild and use the model

Config keys (written by `lungnlb train`; `save_checkpoint` only requires "model"):

    model          {"name": registry name, "kwargs": build_model keyword arguments, "in_channels": int}
    input_size     [H, W] the slices are resized to before the forward pass
    intensity      {"window": [centre, width] or null}: arguments of `lungnlb.io.intensity.to_model_input`
    threshold      probability above which a pixel / slice counts as tumour
    cls_logit_offset  subtracted from the cls logit before the sigmoid (validation-calibrated; default 0)
    training_data  summary of what the model was trained on (sources, counts, licences)
    metrics        validation / held-out figures
    lungnlb_version, format   added by `save_checkpoint`

Resumable training state (optimiser, scheduler, step) is a separate `<name>.state.pt`, written by
`save_training_state`; it too holds only tensors and plain containers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lungnlb
from lungnlb.io.atomic import atomic_write

FORMAT = "lungnlb-checkpoint/1"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_NAME = "default"


def checkpoint_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """Return (weights .pt, config .json) for a checkpoint given as `x`, `x.pt` or `x.json`."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".pt", ".json") else path
    return stem.with_name(stem.name + ".pt"), stem.with_name(stem.name + ".json")


def _plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict on the CPU, unwrapping DistributedDataParallel / DataParallel."""
    module = model.module if hasattr(model, "module") else model
    return {key: value.detach().cpu().clone() for key, value in module.state_dict().items()}


def save_checkpoint(path: str | os.PathLike, model: nn.Module, config: dict[str, Any]) -> Path:
    """Write `<path>.json` (config), then `<path>.pt` (state_dict), each atomically; return the .pt path.

    `config["model"]` must name the registry model and its kwargs so `load_model` can rebuild it.
    """
    if "model" not in config or "name" not in config["model"]:
        raise ValueError("checkpoint config needs config['model']['name'] (the registry model name)")
    weights_path, config_path = checkpoint_paths(path)
    full_config = {"format": FORMAT, "lungnlb_version": lungnlb.__version__, **config}
    text = json.dumps(full_config, indent=2, sort_keys=True, default=_json_default)
    state = _plain_state_dict(model)
    atomic_write(config_path, lambda stream: stream.write(text.encode("utf-8")))
    atomic_write(weights_path, lambda stream: torch.save(state, stream))  # last: readers watch the .pt
    return weights_path


def _json_default(value: Any) -> Any:
    """JSON for numpy scalars / arrays and paths that end up in configs."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot write {type(value).__name__} to a checkpoint config")


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read the JSON config of a checkpoint (`x`, `x.pt` or `x.json`)."""
    _, config_path = checkpoint_paths(path)
    if not config_path.is_file():
        raise FileNotFoundError(f"checkpoint config {config_path} not found (expected beside the .pt weights)")
    try:
        return json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"checkpoint config {config_path} is not valid JSON: {error}") from error


def build_from_config(config: dict[str, Any]) -> nn.Module:
    """Build the (untrained) registry model that a checkpoint config describes."""
    from lungnlb.networks import build_model

    model_config = config["model"]
    return build_model(
        model_config["name"], in_channels=model_config.get("in_channels", 1), **model_config.get("kwargs", {})
    )


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint, load its weights (`weights_only=True`), put it in eval mode.

    Returns `(model, config)`.
    """
    weights_path, _ = checkpoint_paths(path)
    if not weights_path.is_file():
        raise FileNotFoundError(f"checkpoint weights {weights_path} not found")
    config = read_config(path)
    model = build_from_config(config)
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval(), config


def default_checkpoint_path() -> Path | None:
    """The weights shipped with the package (`lungnlb/weights/default.pt`), or None if none are shipped."""
    weights_path, config_path = checkpoint_paths(WEIGHTS_DIR / DEFAULT_NAME)
    return weights_path if weights_path.is_file() and config_path.is_file() else None


def save_training_state(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Atomically write resumable training state (optimiser/scheduler state_dicts, step, ...) to `<path>.state.pt`."""
    weights_path, _ = checkpoint_paths(path)
    state_path = weights_path.with_suffix(".state.pt")
    atomic_write(state_path, lambda stream: torch.save(state, stream))
    return state_path


def load_training_state(path: str | os.PathLike) -> dict[str, Any] | None:
    """Read `<path>.state.pt` written by `save_training_state`, or None if it does not exist."""
    weights_path, _ = checkpoint_paths(path)
    state_path = weights_path.with_suffix(".state.pt")
    if not state_path.is_file():
        return None
    return torch.load(state_path, map_location="cpu", weights_only=True)
