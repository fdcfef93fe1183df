"""What Slicer's official MONAI Label module (plugins/slicer/MONAILabel/MONAILabel.py, monailabel 0.8.5) reads
from the app's /info, checked for every task the LungNLB app serves (the list and its source lines are in
docs/slicer.md, "Using the official MONAI Label module").

- models[name]["type"], ["description"] (updateSelector: KeyError when missing), ["labels"], ["dimension"]
- models/trainers/strategies/scoring[name]["config"]: getParamsFromConfig sends ``v[0]`` of every list value,
  so an empty list is an IndexError on every click
- the model types it has panels for: segmentation/detection, deepgrow/deepedit, scribbles
- train_stats[trainer]["epoch"] / ["total_epochs"] (progress bar) and ["best_metric"] (accuracy bar, multiplied
  as a number)
"""


from benchmarks.app_server import APP_DIR
from benchmarks.app_studies import build_studies, tiny_checkpoint

OFFICIAL_PANEL_TYPES = {"segmentation", "detection", "deepgrow", "deepedit", "scribbles"}


def _app(tmp_path, slices_per_file: int = 1, **conf):
    from main import LungNLBApp

    studies = tmp_path / "studies"
    build_studies(studies, slices_per_file=slices_per_file, files=1)
    checkpoint = tiny_checkpoint(tmp_path / "tiny.pt")
    conf = {"checkpoint": str(checkpoint), "model_dir": str(tmp_path / "model"), **conf}
    return LungNLBApp(str(APP_DIR), str(studies), conf)


def _info(tmp_path):
    return _app(tmp_path).info()


def test_every_task_gives_the_official_module_what_it_reads(tmp_path):
    info = _info(tmp_path)
    assert {"lung_nlb_seg", "lung_watershed"} <= set(info["models"])
    for name, model in info["models"].items():
        assert isinstance(model.get("type"), str) and model["type"], name
        assert isinstance(model.get("description"), str) and model["description"], name
        assert model.get("labels"), name
        assert model.get("dimension") in (2, 3), name
    for section in ("models", "trainers", "strategies", "scoring"):
        for name, task in info.get(section, {}).items():
            for key, value in (task.get("config") or {}).items():
                assert not (isinstance(value, list) and not value), f"{section}/{name}: config {key} is an empty list"
    shown = {name for name, model in info["models"].items() if model["type"] in OFFICIAL_PANEL_TYPES}
    assert {"lung_nlb_seg", "lung_watershed"} <= shown
    assert "lung_nlb_seg" in info["trainers"] and info["strategies"]


def test_train_stats_give_the_official_module_progress_and_accuracy(tmp_path, monkeypatch):
    """During a run `epoch` counts the epochs done of the planned `total_epochs`; `best_metric` is the
    validation Dice of the best epoch so far (the app's own `best_val_dice`); `total_time` comes only
    with the run's publish decision."""
    import torch
    from lib.monailabel_private import train_tasks
    from lib.trainers.fit import SegmentationFit

    app = _app(tmp_path, slices_per_file=4, tracking="none", device="cpu")
    task = train_tasks(app)["lung_nlb_seg"]
    job = task.prepare({**task.config(), "max_epochs": 2, "train_batch_size": 2, "val_split": 0.5}, app.datastore())
    assert job.val_slices
    seen = []
    write_stats = SegmentationFit._write_stats

    def recording(self, *args, **kwargs):
        write_stats(self, *args, **kwargs)
        seen.append(app.info()["train_stats"]["lung_nlb_seg"])

    monkeypatch.setattr(SegmentationFit, "_write_stats", recording)
    SegmentationFit(app.app_config).fit(0, 1, torch.device("cpu"), job)
    assert [(s["epoch"], s["total_epochs"]) for s in seen] == [(1, 2), (2, 2), (2, 2)]
    for stats in seen:
        assert isinstance(stats["best_metric"], float) and 0.0 <= stats["best_metric"] <= 1.0
        assert stats["best_metric"] == stats["best_val_dice"] in [e["val_dice"] for e in stats["epochs"]]
    # its monitor shows `0 if total_time else epoch` epochs done: no total_time until the run has decided
    for stats in seen[:-1]:
        assert "total_time" not in stats and stats["elapsed_time"] >= 0
        assert _official_progress(stats) == stats["epoch"]
    assert seen[-1]["total_time"] >= seen[-2]["elapsed_time"] and "publish" in seen[-1]


def _official_progress(stats):
    """Epochs done as the official module's `monitorTraining` computes them (0.8.5)."""
    return 0 if stats.get("total_time") else stats.get("epoch", 1)


def _official_roi(affine, box, k_range):
    """The `roi` the official module sends for an axis-aligned ROI markup drawn over the pixel box
    [x_min, y_min, x_max, y_max] on slices k_range, computed as its `getROIPointsXYZ` does: the ROI's RAS
    corners (centre -/+ size / 2) through RAS->IJK, rounded, as [i_min, i_max, j_min, j_max, k_min, k_max]
    pairs of those two corners (so reversed on an axis the image flips)."""
    import itertools

    import numpy as np

    (x0, y0, x1, y1), (k0, k1) = box, k_range
    corners = np.array([[i, j, k, 1.0] for i, j, k in itertools.product((x0, x1), (y0, y1), (k0, k1))])
    ras = (affine @ corners.T).T[:, :3]
    centre, size = (ras.min(axis=0) + ras.max(axis=0)) / 2, ras.max(axis=0) - ras.min(axis=0)
    low, high = np.append(centre - size / 2, 1.0), np.append(centre + size / 2, 1.0)
    inverse = np.linalg.inv(affine)
    low_ijk, high_ijk = [round(v) for v in inverse @ low], [round(v) for v in inverse @ high]
    return [v for pair in zip(low_ijk[:3], high_ijk[:3]) for v in pair]


def _watershed(app, image_id, **params):
    import nibabel as nib
    import numpy as np

    result = app.infer({"model": "lung_watershed", "image": image_id, **params})
    mask = np.asarray(nib.load(result["file"]).dataobj) > 0
    return mask, result["params"]


def test_watershed_takes_the_official_modules_roi(tmp_path):
    """Its box prompt (`roi`, IJK pairs, reversed on the flipped axes of a DICOM-derived image) gives the
    same mask as the app's own `box`; the ROI's slice range decides the slice when `slice` (which it takes
    from the Red view's offset in mm) lies outside it."""
    import nibabel as nib
    import numpy as np
    from fastapi import HTTPException

    app = _app(tmp_path, slices_per_file=1)
    studies = tmp_path / "studies"
    image_id = sorted(p.name[: -len(".nii.gz")] for p in (studies / "labels" / "original").glob("*.nii.gz"))[0]
    original = np.asarray(nib.load(studies / "labels" / "original" / f"{image_id}.nii.gz").dataobj) > 0
    xs, ys = np.nonzero(original.reshape(original.shape[0], original.shape[1]))  # NIfTI (i, j) = (x, y)
    box = [int(xs.min()) - 3, int(ys.min()) - 3, int(xs.max()) + 3, int(ys.max()) + 3]
    affine = nib.load(studies / f"{image_id}.nii.gz").affine
    roi = _official_roi(affine, box, (0, 0))
    from_box, _ = _watershed(app, image_id, box=box)
    from_roi, params = _watershed(app, image_id, roi=roi, foreground=[], background=[], slice=0)
    assert params["method"] == "box" and params["box"] == box
    assert from_roi.any() and np.array_equal(from_roi, from_box)

    volume = nib.load(studies / "volume_0.nii.gz")
    assert np.sign(np.diag(volume.affine)[:2]).tolist() == [-1.0, -1.0]  # LPS image: i and j flipped in RAS
    depth = volume.shape[2]
    k = depth // 2
    roi = _official_roi(volume.affine, [200, 200, 260, 250], (k, k))
    assert roi[0] > roi[1] and roi[2] > roi[3]  # the pairs come reversed
    inside, params = _watershed(app, "volume_0", roi=roi, slice=k)
    assert params["slice"] == k and params["box"] == [200, 200, 260, 250]
    per_slice = inside.reshape(-1, depth).sum(axis=0)
    assert per_slice[k] > 0 and per_slice.sum() == per_slice[k]
    _, params = _watershed(app, "volume_0", roi=_official_roi(volume.affine, [200, 200, 260, 250], (1, 3)), slice=depth + 50)
    assert params["slice"] == 2
    for bad in ([1, 2, 3], [0, 10, 0, 10, depth + 5, depth + 9], ["a", 1, 2, 3, 4, 5]):
        try:
            app.infer({"model": "lung_watershed", "image": "volume_0", "roi": bad})
        except HTTPException as error:
            assert error.status_code == 400 and "roi" in error.detail
        else:
            raise AssertionError(f"roi {bad} was accepted")
