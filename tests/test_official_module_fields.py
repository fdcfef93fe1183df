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
    """During a run `epoch` counts the epochs done of the planned `total_epochs`; `best_metric` is the best
    validation Dice so far (the app's own `best_val_dice`)."""
    import torch
    from lib.monailabel_private import train_tasks
    from lib.trainers.fit import SegmentationFit

    app = _app(tmp_path, slices_per_file=4, tracking="none", device="cpu")
    task = train_tasks(app)["lung_nlb_seg"]
    job = task.prepare({**task.config(), "max_epochs": 2, "train_batch_size": 2, "val_split": 0.5}, app.datastore())
    assert job.val_slices
    seen = []
    write_stats = SegmentationFit._write_stats

    def recording(self, *args):
        write_stats(self, *args)
        seen.append(app.info()["train_stats"]["lung_nlb_seg"])

    monkeypatch.setattr(SegmentationFit, "_write_stats", recording)
    SegmentationFit(app.app_config).fit(0, 1, torch.device("cpu"), job)
    assert [(s["epoch"], s["total_epochs"]) for s in seen] == [(1, 2), (2, 2), (2, 2)]
    for stats in seen:
        assert isinstance(stats["best_metric"], float) and 0.0 <= stats["best_metric"] <= 1.0
        assert stats["best_metric"] == stats["best_val_dice"] == max(e["val_dice"] for e in stats["epochs"])
        assert stats["total_time"] >= 0
