"""Shipped weights on the GPU against the CPU: agreement and latency of `Predictor` on the bundled CT.

The app and `lungnlb` use CUDA when present; this checks that the GPU path gives the CPU's answer
(the same checkpoint on the sample series of sample_data/, whole volume) and how fast it is:

* agreement: max |p_gpu - p_cpu| over mask and slice probabilities, Dice between the two
  thresholded masks over the volume, and whether every slice gets the same tumour / no-tumour call;
* latency: median ms per 512 x 512 slice and per 64-slice volume (the series' slices repeated up
  to 64), CUDA synchronised, after warm-up; the CPU's with the machine's cores for comparison.

    python -m benchmarks.gpu_inference          # prints JSON
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from lungnlb.data.studies import image_path, read_records, read_study_image
from lungnlb.inference import Predictor
from lungnlb.stamp import run_stamp

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data" / "studies"


def sample_volume() -> tuple[np.ndarray, str]:
    """The first CT volume of the bundled sample studies."""
    for record in read_records(SAMPLE):
        image = read_study_image(image_path(SAMPLE, record["image_id"]))
        if image.array.ndim == 3:
            return image.array, record["intensity"]
    raise FileNotFoundError(f"no CT volume in {SAMPLE}")


def median_ms(fn, device: torch.device, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 2)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this compares the GPU path with the CPU")
    volume, intensity = sample_volume()
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    predictors = {device.type: Predictor.from_checkpoint(device=device, batch_size=16) for device in (cpu, gpu)}
    outputs = {name: predictor.predict(volume, intensity) for name, predictor in predictors.items()}
    p_cpu, p_gpu = outputs["cpu"], outputs["cuda"]
    m_cpu, m_gpu = p_cpu.probability > 0.5, p_gpu.probability > 0.5
    union = m_cpu.sum() + m_gpu.sum()
    report = {
        **run_stamp(), "device": torch.cuda.get_device_name(gpu), "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(), "volume_shape": list(volume.shape),
        "max_abs_diff_mask_probability": float(np.abs(p_cpu.probability - p_gpu.probability).max()),
        "max_abs_diff_slice_probability": float(np.abs(p_cpu.slice_probability - p_gpu.slice_probability).max()),
        "mask_dice_gpu_vs_cpu": float(2 * (m_cpu & m_gpu).sum() / union) if union else 1.0,
        "mask_voxels_cpu_gpu": [int(m_cpu.sum()), int(m_gpu.sum())],
        "same_slice_calls": bool(np.array_equal(p_cpu.slice_probability > 0.5, p_gpu.slice_probability > 0.5)),
        "ms": {},
    }
    volume_64 = np.resize(volume, (64, *volume.shape[1:]))
    for name, predictor in predictors.items():
        device = torch.device(name)
        report["ms"][name] = {
            "slice": median_ms(lambda: predictor.predict(volume[0], intensity), device, 30 if name == "cuda" else 10),
            "volume_64": median_ms(lambda: predictor.predict(volume_64, intensity), device, 10 if name == "cuda" else 3),
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
