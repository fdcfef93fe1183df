"""Export a checkpoint as TorchScript and as a MONAI bundle folder.

TorchScript (`torch.jit.trace` of `SegClsOutputs`): forward(x (B, 1, H, W) in [0, 1]) ->
(seg logits (B, 1, H, W), cls logits (B, 1)); the checkpoint config is stored as the extra file
`config.json`.

MONAI bundle (`python -m monai.bundle run --config_file configs/inference.json`):

    configs/metadata.json    version, task, inputs/outputs, intensity window, licences of the training data
    configs/inference.json   LoadImaged -> HU lung window to [0, 1] -> (Y, X) order -> resize to the input
                             size -> SegmentationOutput network -> invert resize/order -> sigmoid > threshold
                             -> SaveImaged (NIfTI mask beside the input geometry)
    models/model.pt          the state_dict (as in the checkpoint)
    docs/README.md           what it does, how to run it, the training data and licences
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform
from torch import nn

from lungnlb.checkpoint import build_from_config, checkpoint_paths, load_model
from lungnlb.io.atomic import atomic_write, atomic_write_text


class KeepLungComponentsd(MapTransform):
    """Keep the components of a binary (1, Y, X) ``pred`` that touch the lung field of ``image`` (the
    model input, same grid), as `lungnlb.inference.Predictor` does; a crop keeps them all."""

    def __init__(self, keys: str, image_key: str, config: dict[str, Any]) -> None:
        super().__init__(keys)
        self.image_key = image_key
        self.config = config

    def __call__(self, data: dict) -> dict:
        from lungnlb.inference import remove_small_components, slice_lung_field

        data = dict(data)
        field = slice_lung_field(np.asarray(data[self.image_key])[0], self.config)
        if field is None:
            return data
        for key in self.key_iterator(data):
            pred = data[key]
            kept = remove_small_components(np.asarray(pred)[:1] > 0.5, 1, field[None])
            data[key] = pred * torch.as_tensor(kept, dtype=pred.dtype, device=pred.device)
        return data


class SegClsOutputs(nn.Module):
    """Wrap a registry model so it returns a (seg logits, cls logits) tuple instead of a dict."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = self.model(x)
        return output["seg"], output["cls"]


class SegmentationOutput(nn.Module):
    """A registry segmentation model returning only its (B, 1, H, W) seg logits (for MONAI inferers).

    Built from the checkpoint config's model name and kwargs; `weights` (a state_dict file) is loaded
    with `weights_only=True` when given.
    """

    def __init__(self, name: str, kwargs: dict[str, Any] | None = None, in_channels: int = 1,
                 weights: str | None = None) -> None:
        super().__init__()
        self.model = build_from_config({"model": {"name": name, "kwargs": kwargs or {}, "in_channels": in_channels}})
        if weights is not None:
            self.model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["seg"]


def export_torchscript(checkpoint: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Trace the checkpoint's model at its input size and save it (atomically) with its config."""
    model, config = load_model(checkpoint)
    if "seg" not in model(torch.zeros(1, 1, *config["input_size"])):
        raise ValueError(f"{config['model']['name']} has no segmentation head; TorchScript export needs one")
    example = torch.rand(1, 1, *config["input_size"])
    traced = torch.jit.trace(SegClsOutputs(model).eval(), example, check_trace=False)
    path = Path(path)
    extra = {"config.json": json.dumps(config)}
    atomic_write(path, lambda stream: torch.jit.save(traced, stream, _extra_files=extra))
    return path


def inference_config(config: dict[str, Any]) -> dict[str, Any]:
    """The bundle's configs/inference.json for a checkpoint config: for a native-resolution
    checkpoint (``patch_size``) the deployed form of `Predictor` — MONAI's Gaussian sliding window at
    the slice's own size over the body's box, air padding, components under `MIN_COMPONENT_PIXELS`
    and those that miss the lung field of a whole slice removed (`postprocessing`) — else the slice
    resized to ``input_size`` for one forward pass."""
    from lungnlb.inference import BODY_MARGIN, WINDOW_BATCH, WINDOW_OVERLAP
    from lungnlb.io.intensity import LUNG_WINDOW, IntensityMapping, window_bounds

    low, high = window_bounds(tuple((config.get("intensity") or {}).get("window") or LUNG_WINDOW))
    size = [int(v) for v in config["input_size"]]
    native = "patch_size" in config
    air = IntensityMapping.from_config(config.get("intensity")).air()
    # a native model's windows lie where Predictor lays them, over the body's box (its output depends on where they fall)
    body = {"_target_": "CropForegroundd", "keys": "image", "source_key": "image", "allow_smaller": True,
            "select_fn": f"$lambda x: x > {air + BODY_MARGIN!r}"}
    size_step = [body] if native else [{"_target_": "Resized", "keys": "image", "spatial_size": size, "mode": "bilinear"}]
    inferer = {"_target_": "SimpleInferer"}
    if native:
        inferer = {"_target_": "SlidingWindowInferer", "roi_size": [int(v) for v in config["patch_size"]],
                   "sw_batch_size": WINDOW_BATCH, "overlap": WINDOW_OVERLAP, "mode": "gaussian",
                   "padding_mode": "constant", "cval": air}
    return {
        "imports": ["$import torch", "$import lungnlb.export"],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "input_file": "image.nii.gz",
        "output_dir": "$@bundle_root + '/eval'",
        "network_def": {
            "_target_": "lungnlb.export.SegmentationOutput",
            "name": config["model"]["name"],
            "kwargs": config["model"].get("kwargs", {}),
            "in_channels": config["model"].get("in_channels", 1),
            "weights": "$@bundle_root + '/models/model.pt'",
        },
        "network": "$@network_def.to(@device).eval()",
        "datalist": [{"image": "@input_file"}],
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image", "image_only": True, "ensure_channel_first": True},
                {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": low, "a_max": high,
                 "b_min": 0.0, "b_max": 1.0, "clip": True},
                {"_target_": "Transposed", "keys": "image", "indices": [0, 2, 1]},
                *size_step,
                {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
            ],
        },
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "num_workers": 0},
        "inferer": inferer,
        "postprocessing": {"_target_": "Compose", "transforms": postprocessing(config)},
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
        },
        "run": ["$@evaluator.run()"],
    }


def postprocessing(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The bundle's post-processing: a native checkpoint's mask is made on the model's grid (where
    the lung field is found), then put back in the input's orientation; a whole-slice checkpoint's
    probabilities are resized back first."""
    from lungnlb.inference import MIN_COMPONENT_PIXELS

    invert = {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
              "nearest_interp": False, "to_tensor": True}
    discrete = [{"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
                {"_target_": "AsDiscreted", "keys": "pred", "threshold": float(config.get("threshold", 0.5))}]
    save = {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
            "output_dtype": "$torch.uint8", "separate_folder": False, "resample": False}
    if "patch_size" not in config:
        return [invert, *discrete, save]
    minimum = int(config.get("min_component_pixels", MIN_COMPONENT_PIXELS))
    return [*discrete,
            {"_target_": "RemoveSmallObjectsd", "keys": "pred", "min_size": minimum, "connectivity": 2},
            {"_target_": "lungnlb.export.KeepLungComponentsd", "keys": "pred", "image_key": "image",
             "config": {key: config[key] for key in ("lung_filter", "lung_closing_px") if key in config}},
            invert, save]


def bundle_metadata(config: dict[str, Any]) -> dict[str, Any]:
    """configs/metadata.json: what the network takes and returns, and what it was trained on."""
    import monai

    import lungnlb

    native = "patch_size" in config
    size = [int(v) for v in config["patch_size" if native else "input_size"]]
    return {
        "version": lungnlb.__version__,
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "name": f"lungnlb_{config['model']['name']}",
        "task": "Lung tumour segmentation on axial CT slices (NLB U-Net, Samarin, Toropov et al.)",
        "description": "2D U-Net with specialised non-local blocks; input one axial CT slice in HU.",
        "authors": "LungNLB contributors",
        "copyright": "Apache-2.0 (code); weights trained on data under the licences in data_source",
        "data_source": config.get("training_data", {}).get("sources", {}),
        "intended_use": "Research only; not for clinical use.",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                                 "spatial_shape": size, "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": native, "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 1,
                                 "spatial_shape": size, "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": native, "channel_def": {"0": "tumour"}}},
        },
        "checkpoint_metrics": config.get("metrics", {}),
    }


def _bundle_readme(config: dict[str, Any]) -> str:
    sources = config.get("training_data", {}).get("sources", {})
    licences = "\n".join(f"- {name}: {entry.get('licence', '')}" for name, entry in sources.items())
    return (
        f"# LungNLB {config['model']['name']} bundle\n\n"
        "Segments lung tumours on one axial CT slice (2D NIfTI in Hounsfield units).\n\n"
        "    python -m monai.bundle run --config_file configs/inference.json --bundle_root . "
        "--input_file IMAGE.nii.gz --output_dir OUT\n\n"
        "Writes `OUT/<name>_seg.nii.gz`, a uint8 mask with the input's geometry. Needs the `lungnlb` package "
        "(the network is built by `lungnlb.export.SegmentationOutput`).\n\n"
        + (f"Sliding window of {config['patch_size']} at the slice's own pixel size"
           if "patch_size" in config else f"Input size {config['input_size']}")
        + ", lung window of `lungnlb.io.intensity`, threshold "
        f"{config.get('threshold', 0.5)}.\n\n## Training data and licences\n\n{licences or '- unknown'}\n\n"
        "Research use only; not a medical device.\n"
    )


def export_bundle(checkpoint: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Write a MONAI bundle folder for a segmentation checkpoint; returns the folder."""
    weights_path, _ = checkpoint_paths(checkpoint)
    _, config = load_model(checkpoint)
    folder = Path(folder)
    texts = {
        folder / "configs" / "metadata.json": json.dumps(bundle_metadata(config), indent=2, default=float),
        folder / "configs" / "inference.json": json.dumps(inference_config(config), indent=2),
        folder / "docs" / "README.md": _bundle_readme(config),
    }
    for path, text in texts.items():
        atomic_write_text(path, text)
    atomic_write(folder / "models" / "model.pt", lambda stream: stream.write(weights_path.read_bytes()))
    return folder
