"""What Slicer's official MONAI Label module (plugins/slicer/MONAILabel/MONAILabel.py, monailabel 0.8.5) reads
from the app's /info, checked for every task the LungNLB app serves (the list and its source lines are in
docs/slicer.md, "Using the official MONAI Label module").

- models[name]["type"], ["description"] (updateSelector: KeyError when missing), ["labels"], ["dimension"]
- models/trainers/strategies/scoring[name]["config"]: getParamsFromConfig sends ``v[0]`` of every list value,
  so an empty list is an IndexError on every click
- the model types it has panels for: segmentation/detection, deepgrow/deepedit, scribbles
"""

import sys

from app_support import APP_DIR, build_studies, tiny_checkpoint

OFFICIAL_PANEL_TYPES = {"segmentation", "detection", "deepgrow", "deepedit", "scribbles"}


def _info(tmp_path):
    sys.path.insert(0, str(APP_DIR))
    from main import LungNLBApp

    studies = tmp_path / "studies"
    build_studies(studies, slices_per_file=1, files=1)
    checkpoint = tiny_checkpoint(tmp_path / "tiny.pt")
    app = LungNLBApp(str(APP_DIR), str(studies), {"checkpoint": str(checkpoint), "model_dir": str(tmp_path / "model")})
    return app.info()


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
