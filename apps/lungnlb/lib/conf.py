"""The app's `--conf key value` settings, parsed and checked once at start-up.

    monailabel start_server --app apps/lungnlb --studies <folder> --conf models all --conf device cpu

Keys (all optional):

    models           "all" or a comma list of lung_nlb_seg, lung_nlb_cls, lung_watershed   [all]
    checkpoint       weights (of a segmentation model) to start from when nothing was published yet, or "none" to start
                     untrained even if lungnlb ships default weights       [lungnlb's shipped default]
    model_dir        where training publishes weights and train stats      [<app>/model]
    device           "auto", "cpu", "cuda" or "cuda:N"                       [auto: cuda if present]
    batch_size       slices per forward pass at inference                    [16]
    image_cache_mb   MiB of decoded datastore images kept in memory between infer requests
                     (LRU; a changed file is read again); 0 turns the cache off   [256]
    original_weight  training weight of `original` (watershed) labels; `final` labels weigh 1   [0.3]
    tracking         "mlflow" (SQLite store) or "none"                        [mlflow]
    tracking_uri     MLflow tracking URI                                      [sqlite:///<model_dir>/mlflow.db]
    allowed_paths    os.pathsep-separated folders whose files may be named as `image` by absolute
                     path (e.g. a DICOM series folder on the server); the studies folder and
                     uploads are always allowed                               [none]
    max_upload_mb    largest request body (an upload) the server reads, in MiB; larger ones get 413
                                                                              [1024]
    max_image_size   largest image accepted, "<columns>x<rows>x<slices>", checked from the file's header
                     before its voxels are read (a small gzip can expand to gigabytes)   [512x512x2000]
    allowed_hosts    comma-separated host names (or addresses) requests may carry in their Host header
                     besides localhost, 127.0.0.1 and [::1], e.g. the names a proxy in front is reached
                     by; "*" allows any. Others get 400 (a DNS-rebinding page carries its own name)
                                                                              [none]
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from lungnlb.checkpoint import read_config
from lungnlb.networks import is_segmentation_model

SEG_MODEL = "lung_nlb_seg"
CLS_MODEL = "lung_nlb_cls"
WATERSHED_MODEL = "lung_watershed"
ALL_MODELS = (SEG_MODEL, CLS_MODEL, WATERSHED_MODEL)


@dataclass(frozen=True)
class AppConfig:
    """Checked values of the `--conf` keys (see the module docstring)."""

    app_dir: Path
    studies: Path
    models: tuple[str, ...] = ALL_MODELS
    checkpoint: Path | None = None
    use_default_weights: bool = True
    model_dir: Path = Path("model")
    device: str = "auto"
    batch_size: int = 16
    image_cache_mb: float = 256.0
    original_weight: float = 0.3
    tracking: str = "mlflow"
    tracking_uri: str = ""
    allowed_paths: tuple[Path, ...] = field(default_factory=tuple)
    max_upload_mb: float = 1024.0
    max_image_size: tuple[int, int, int] = (512, 512, 2000)
    allowed_hosts: tuple[str, ...] = ()

    @property
    def published_checkpoint(self) -> Path:
        """Where training publishes the segmentation model (`.pt` + `.json` beside it)."""
        return self.model_dir / f"{SEG_MODEL}.pt"

    @property
    def train_stats_path(self) -> Path:
        return self.model_dir / f"{SEG_MODEL}_train_stats.json"

    @property
    def state_dir(self) -> Path:
        """App state inside the studies folder: label versions, proposals, score caches."""
        return self.studies / ".lungnlb"


def _models(value: str) -> tuple[str, ...]:
    if value.strip().lower() == "all":
        return ALL_MODELS
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    unknown = [name for name in names if name not in ALL_MODELS]
    if unknown or not names:
        raise ValueError(f"--conf models: unknown model(s) {unknown or value!r}; choose 'all' or from {ALL_MODELS}")
    return names


def _positive(key: str, value: str, kind: type) -> int | float:
    try:
        number = kind(value)
    except ValueError as error:
        raise ValueError(f"--conf {key}: {value!r} is not a {kind.__name__}") from error
    if not 0 < number < float("inf"):
        raise ValueError(f"--conf {key}: must be a finite number > 0, got {value!r}")
    return number


def _non_negative(key: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError as error:
        raise ValueError(f"--conf {key}: {value!r} is not a number") from error
    if not number >= 0:
        raise ValueError(f"--conf {key}: must be >= 0, got {value!r}")
    return number


def _image_size(value: str) -> tuple[int, int, int]:
    """`--conf max_image_size` "512x512x2000" -> (columns, rows, slices), each a positive integer."""
    parts = value.lower().split("x")
    try:
        size = tuple(int(part) for part in parts)
    except ValueError:
        size = ()
    if len(size) != 3 or min(size) <= 0:
        raise ValueError(f"--conf max_image_size: expected <columns>x<rows>x<slices> such as 512x512x2000, got {value!r}")
    return size  # type: ignore[return-value]


def _host_names(value: str) -> tuple[str, ...]:
    """`--conf allowed_hosts` "ct-lab.example,192.0.2.10" -> its names; each must look like a host name."""
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    bad = [name for name in names if not re.fullmatch(r"\*|[A-Za-z0-9._-]{1,253}|\[?[0-9A-Fa-f:.]{2,45}\]?", name)]
    if bad:
        raise ValueError(f"--conf allowed_hosts: not host names: {bad}; expected e.g. ct-lab.example,192.0.2.10")
    return names


def _check_segmentation_checkpoint(path: Path) -> None:
    """`--conf checkpoint` must be a weights file whose config names a segmentation model."""
    if not path.is_file():
        raise ValueError(f"--conf checkpoint: {path} is not a file")
    name = read_config(path)["model"]["name"]
    if not is_segmentation_model(name):
        raise ValueError(f"--conf checkpoint: {path} holds {name}, a classification-only model; "
                         "the app needs a segmentation model such as unet_sl_nlb")


def parse_conf(app_dir: str | os.PathLike, studies: str | os.PathLike, conf: dict[str, str]) -> AppConfig:
    """Build an `AppConfig` from MONAI Label's conf dict; a bad value raises ValueError naming the key."""
    app_dir = Path(app_dir).resolve()
    model_dir = Path(conf.get("model_dir", app_dir / "model")).resolve()
    checkpoint = conf.get("checkpoint")
    if checkpoint and checkpoint != "none":
        _check_segmentation_checkpoint(Path(checkpoint))
    tracking = conf.get("tracking", "mlflow").lower()
    if tracking not in ("mlflow", "none"):
        raise ValueError(f"--conf tracking: choose 'mlflow' or 'none', got {tracking!r}")
    original_weight = float(conf.get("original_weight", 0.3))
    if not 0.0 <= original_weight <= 1.0:
        raise ValueError(f"--conf original_weight: must lie in [0, 1], got {original_weight}")
    allowed = conf.get("allowed_paths", "")
    return AppConfig(
        app_dir=app_dir,
        studies=Path(studies).resolve(),
        models=_models(conf.get("models", "all")),
        checkpoint=Path(checkpoint).resolve() if checkpoint and checkpoint != "none" else None,
        use_default_weights=checkpoint != "none",
        model_dir=model_dir,
        device=conf.get("device", "auto"),
        batch_size=int(_positive("batch_size", conf.get("batch_size", "16"), int)),
        image_cache_mb=_non_negative("image_cache_mb", conf.get("image_cache_mb", "256")),
        original_weight=original_weight,
        tracking=tracking,
        tracking_uri=conf.get("tracking_uri", f"sqlite:///{model_dir / 'mlflow.db'}"),
        allowed_paths=tuple(Path(p).resolve() for p in allowed.split(os.pathsep) if p),
        max_upload_mb=float(_positive("max_upload_mb", conf.get("max_upload_mb", "1024"), float)),
        max_image_size=_image_size(conf.get("max_image_size", "512x512x2000")),
        allowed_hosts=_host_names(conf.get("allowed_hosts", "")),
    )
