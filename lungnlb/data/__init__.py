"""The data layer: what a prepared studies folder holds and how its labelled slices are enumerated.

Sits between `lungnlb.io` (file formats) and the engine (training, evaluation, inference): it reads
files through `lungnlb.io` and knows nothing about models.
"""

from lungnlb.data.studies import (
    IMAGE_SUFFIX,
    image_path,
    is_studies_folder,
    label_path,
    read_records,
    read_sidecar,
    read_study_image,
    slice_plan,
    write_sidecar,
)

__all__ = ["IMAGE_SUFFIX", "image_path", "is_studies_folder", "label_path", "read_records", "read_sidecar",
           "read_study_image", "slice_plan", "write_sidecar"]
