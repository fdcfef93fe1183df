"""What the LungNLB infer tasks share: the request's image, checked, and a temporary result file."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from monailabel.interfaces.tasks.infer_v2 import InferTask

from lib.conf import AppConfig
from lib.images import load_image, study_intensity
from lungnlb.io import ImageData


class LungInferTask(InferTask):
    """An InferTask whose request carries `image` (a checked path) and `image_id` (or None).

    `LungNLBApp.infer` resolves and checks the request's image before calling the task, so a task
    only reads it (4xx on unusable content) and writes its result to a temporary NIfTI file that
    MONAI Label streams back and deletes.
    """

    def __init__(self, app_config: AppConfig, **kwargs: Any):
        super().__init__(**kwargs)
        self.app_config = app_config

    def read(self, request: dict[str, Any]) -> ImageData:
        """The request's image; intensity from the request, else the study sidecar, else the reader."""
        intensity = request.get("intensity") or study_intensity(self.app_config, request.get("image_id"))
        return load_image(Path(request["image"]), intensity)

    @staticmethod
    def result_path() -> Path:
        """A fresh temporary `.nii.gz` path for the result (deleted by MONAI Label after sending)."""
        with tempfile.NamedTemporaryFile(prefix="lungnlb_", suffix=".nii.gz", delete=False) as handle:
            return Path(handle.name)
