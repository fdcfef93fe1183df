"""Training: checkpoints, dataset from prepared folders, patient splits, loss masking, the loop, resume, DDP."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from lungnlb.checkpoint import default_checkpoint_path, load_model, read_config, save_checkpoint
from lungnlb.inference import Predictor
from lungnlb.networks import build_model
from lungnlb.training import MultiTaskLoss, TrainConfig, load_slices, make_split, read_records, train
from lungnlb.training.split import load_split
from train_helpers import TINY_KWARGS, synthetic_studies


def tiny_config(studies, out, **overrides) -> TrainConfig:
    settings = dict(data=str(studies), out=str(out), model="unet_sl_nlb", model_kwargs=TINY_KWARGS, input_size=32,
                    steps=3, batch_size=4, val_every=2, progress=False, tensorboard=False, val_fraction=0.2,
                    test_fraction=0.2)
    return TrainConfig(**{**settings, **overrides})


def test_checkpoint_round_trip_weights_only(tmp_path):
    model = build_model("unet_sl_nlb", **TINY_KWARGS)
    config = {"model": {"name": "unet_sl_nlb", "kwargs": TINY_KWARGS}, "input_size": [32, 32]}
    weights = save_checkpoint(tmp_path / "ckpt", model, config)
    state = torch.load(weights, weights_only=True)
    assert set(state) == set(model.state_dict())
    loaded, loaded_config = load_model(weights)
    assert loaded_config["model"]["name"] == "unet_sl_nlb" and "lungnlb_version" in loaded_config
    x = torch.rand(1, 1, 32, 32)
    model.eval()
    assert torch.allclose(loaded(x)["seg"], model(x)["seg"])
    assert not list(tmp_path.glob(".*tmp"))
    umask = os.umask(0o022)
    os.umask(umask)
    for path in (weights, weights.with_suffix(".json")):  # the permissions of a plain open(), not mkstemp's 0600
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_checkpoint_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="model"):
        save_checkpoint(tmp_path / "x", build_model("unet", features=[4, 4, 8, 8, 16, 4]), {"input_size": [32, 32]})
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_model(tmp_path / "missing.pt")


def test_shipped_default_weights_load_and_predict():
    path = default_checkpoint_path()
    assert path is not None, "lungnlb/weights/default.pt (+ .json) must ship with the package"
    config = read_config(path)
    assert set(config["training_data"]["sources"]) >= {"lidc-idri", "iq-othnccd"}
    predictor = Predictor.from_checkpoint()  # the shipped weights, loaded with weights_only=True
    result = predictor.predict(np.full((2, 100, 90), -800.0, np.float32), "hu")
    assert result.probability.shape == (2, 100, 90) and result.slice_probability.shape == (2,)


def test_predictor_accepts_read_only_arrays_and_leaves_them_alone(recwarn):
    predictor = Predictor.from_checkpoint()
    volume = np.full((2, 64, 64), -800.0, np.float32)
    volume.setflags(write=False)
    result = predictor.predict(volume, "hu")
    assert result.probability.shape == (2, 64, 64)
    assert np.all(volume == -800.0)
    assert not [w for w in recwarn if "not writable" in str(w.message)]


def test_dataset_samples_follow_sidecars(tmp_path):
    studies = synthetic_studies(tmp_path)
    samples = load_slices(studies, (32, 32))
    by_id = {}
    for sample in samples:
        by_id.setdefault(sample.image_id, []).append(sample)
    assert all(s.image.shape == (32, 32) and 0 <= s.image.min() and s.image.max() <= 1 for s in samples)
    assert [(s.z, s.mask is not None, s.class_label) for s in by_id["vol0"]] == [(1, True, 1), (2, False, 0)]
    cls_only = by_id["c0_cls"][0]
    assert cls_only.mask is None and cls_only.class_label == 0
    assert by_id["c0_s0"][0].mask.any() and not by_id["c0_s1"][0].mask.any()


def test_split_is_by_case_and_reusable(tmp_path):
    studies = synthetic_studies(tmp_path, n_cases=10)
    records = read_records(studies)
    split = make_split(records, seed=1, val_fraction=0.2, test_fraction=0.2)
    case_subset = {}
    for subset, ids in split["images"].items():
        for record in records:
            if record["image_id"] in ids:
                assert case_subset.setdefault(record["case"], subset) == subset
    assert split["cases"]["test"] and split["cases"]["val"]
    assert sorted(sum(split["images"].values(), [])) == sorted(r["image_id"] for r in records)
    (tmp_path / "split.json").write_text(json.dumps(split))
    assert load_split(tmp_path / "split.json", records)["images"] == split["images"]


def test_loss_ignores_missing_labels():
    loss = MultiTaskLoss(seg_weight=1.0, cls_weight=1.0)
    output = {"seg": torch.randn(2, 1, 8, 8, requires_grad=True), "cls": torch.randn(2, 1, requires_grad=True)}
    batch = {"mask": torch.zeros(2, 1, 8, 8), "has_mask": torch.tensor([False, False]),
             "label": torch.ones(2, 1), "has_label": torch.tensor([True, False])}
    total, parts = loss(output, batch)
    assert parts["seg"] == 0.0
    expected = torch.nn.functional.binary_cross_entropy_with_logits(output["cls"][:1], torch.ones(1, 1))
    assert torch.isclose(total, expected)
    total.backward()
    assert output["cls"].grad[1].abs().sum() == 0 and output["seg"].grad.abs().sum() == 0


def test_pos_weight_balances_the_classes_drawn():
    from lungnlb.training.trainer import balanced_pos_weight
    from lungnlb.training.dataset import SliceSample

    def sample(label):
        return SliceSample(image_id="x", case="c", source="s", z=0, image=np.zeros((4, 4), np.float32), mask=None,
                           class_label=label)

    samples = [sample(1), sample(1), sample(1), sample(0), sample(None)]
    # uniform draws: 3 positives for 1 negative -> a positive term weighs 1/3
    assert balanced_pos_weight(samples, np.ones(5)) == pytest.approx(1 / 3)
    assert balanced_pos_weight(samples, np.array([1, 1, 1, 6, 9.0])) == pytest.approx(2.0)
    assert balanced_pos_weight(samples[:3], np.ones(3)) is None
    loss = MultiTaskLoss(0.0, 1.0, pos_weight=0.25)
    batch = {"label": torch.tensor([[1.0], [0.0]]), "has_label": torch.tensor([True, True])}
    total, _ = loss({"cls": torch.zeros(2, 1)}, batch)
    assert total.item() == pytest.approx((0.25 + 1.0) / 2 * np.log(2))
    with pytest.raises(ValueError, match="pos_weight"):
        MultiTaskLoss(pos_weight=0.0)


def test_predictor_applies_the_calibrated_logit_offset(tmp_path):
    model = build_model("unet_sl_nlb", **TINY_KWARGS)
    config = {"model": {"name": "unet_sl_nlb", "kwargs": TINY_KWARGS, "in_channels": 1}, "input_size": [32, 32]}
    save_checkpoint(tmp_path / "plain", model, config)
    save_checkpoint(tmp_path / "shifted", model, {**config, "cls_logit_offset": 2.0})
    image = np.full((40, 40), -700.0, np.float32)
    plain = Predictor.from_checkpoint(tmp_path / "plain.pt").predict(image, "hu").slice_probability
    shifted = Predictor.from_checkpoint(tmp_path / "shifted.pt").predict(image, "hu").slice_probability
    logit = np.log(plain / (1 - plain))
    assert shifted == pytest.approx(1 / (1 + np.exp(-(logit - 2.0))), rel=1e-4)


def test_train_writes_checkpoints_split_and_resumes(tmp_path):
    studies = synthetic_studies(tmp_path)
    result = train(tiny_config(studies, tmp_path / "run", steps=2))
    config = read_config(result["best"])
    assert config["input_size"] == [32, 32] and config["step"] == 2
    assert config["cls_logit_offset"] == config["metrics"]["cls_logit_offset"]  # calibrated on validation
    assert "synthetic" in config["training_data"]["sources"]
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert set(split["cases"]) == {"train", "val", "test"}
    resumed = train(tiny_config(studies, tmp_path / "run", steps=4, resume=True))
    assert read_config(resumed["last"])["step"] == 4
    predictor = Predictor.from_checkpoint(resumed["last"])
    result = predictor.predict(np.full((3, 40, 50), -700.0, np.float32), "hu")
    assert result.probability.shape == (3, 40, 50) and result.slice_probability.shape == (3,)


def test_keep_validated_keeps_every_validated_checkpoint(tmp_path):
    studies = synthetic_studies(tmp_path)
    train(tiny_config(studies, tmp_path / "plain", steps=4))
    assert not list((tmp_path / "plain").glob("step_*"))  # off by default: only best and last
    result = train(tiny_config(studies, tmp_path / "run", steps=4, keep_validated=True))
    kept = {path.name for path in (tmp_path / "run").glob("step_*")}
    assert kept == {"step_2.pt", "step_2.json", "step_4.pt", "step_4.json"}
    assert [read_config(tmp_path / "run" / f"step_{n}.pt")["step"] for n in (2, 4)] == [2, 4]
    early = torch.load(tmp_path / "run" / "step_2.pt", weights_only=True)
    last = torch.load(result["last"], weights_only=True)
    assert any(not torch.equal(early[key], last[key]) for key in last)  # step 2's weights, not overwritten


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, studies: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    result = train(tiny_config(studies, out, steps=3, device="cpu", val_every=10))
    torch.save(result["model"].state_dict(), os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_end_with_identical_weights(tmp_path):
    studies = synthetic_studies(tmp_path)
    out = tmp_path / "ddp"
    out.mkdir()
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(studies), str(out)), nprocs=2, join=True)
    first = torch.load(out / "rank0.pt", weights_only=True)
    second = torch.load(out / "rank1.pt", weights_only=True)
    torch.manual_seed(0)  # the trainer seeds with config.seed = 0 before building the model
    initial = build_model("unet_sl_nlb", **TINY_KWARGS).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], initial[k]) for k in first if first[k].is_floating_point())


@pytest.mark.slow
def test_paper_tables_smoke_budget(tmp_path):

    from train_helpers import DATA

    src = tmp_path / "src"
    (src / "lidc").mkdir(parents=True)
    for npz in sorted((DATA / "lidc-idri" / "slices").glob("*.npz"))[:3]:
        (src / "lidc" / npz.name).symlink_to(npz)
    for class_name in ("normal", "malignant"):
        (src / "iq" / class_name).mkdir(parents=True)
        for jpeg in sorted((DATA / "iq-othnccd" / class_name).glob("*.jpg"))[:60:20]:  # three case blocks
            (src / "iq" / class_name / jpeg.name).symlink_to(jpeg)
    from experiments import paper_tables

    markdown = tmp_path / "results.md"
    assert paper_tables.main(["--budget", "smoke", "--data", str(src), "--cache", str(tmp_path / "studies"),
                              "--out", str(tmp_path / "out"), "--markdown", str(markdown)]) == 0
    result = json.loads((tmp_path / "out" / "paper_tables.json").read_text())
    runs = result["runs"]
    assert [(run["row"], run["seed"]) for run in runs] == [("unet", 0), ("unet_sl_nlb", 0)]
    assert all(0 <= run["dice"] <= 1 and 0 <= run["f1"] <= 1 for run in runs)
    assert all(run["patch_size"] == 64 and 0 < run["steps"] <= 4 and run["train_seconds"] > 0 for run in runs)
    assert result["settings"]["budget_s"] == paper_tables.BUDGETS["smoke"]["seconds"]
    text = markdown.read_text()
    assert "Table I" in text and "Table II" in text and "S-L >= S-B" in text and "| unet | 1 |" in text


def test_patient_cv_folds_hold_out_each_masked_patient_once():
    from experiments import patient_cv

    records = [{"image_id": f"p{p}_{z}", "case": f"p{p}", "source": "lidc", "class_label": 1,
                "labelled_slices": [0]} for p in range(4) for z in range(2)]
    records += [{"image_id": f"{c}{b}", "case": f"{c}/{b}", "source": "iq", "class_label": int(c == "m")}
                for c in "mn" for b in range(8)]
    patients = patient_cv.segmentation_patients(records)
    assert patients == ["p0", "p1", "p2", "p3"]
    for patient in patients:
        split, validation_patient = patient_cv.fold_split(records, patient, patients)
        cases = split["cases"]
        assert cases["test"] == [patient] and validation_patient in cases["val"] and validation_patient != patient
        assert [c for c in cases["val"] if c in patients] == [validation_patient]
        assert sorted(cases["train"] + cases["val"] + cases["test"]) == sorted({r["case"] for r in records})
        assert split["images"]["test"] == [f"{patient}_0", f"{patient}_1"]


def test_a_time_budget_shortens_the_run_and_its_schedule(tmp_path):
    from lungnlb.training.trainer import BUDGET_PROBE_STEPS, WarmupCosine, steps_within_budget

    config = tiny_config(tmp_path, tmp_path / "run", steps=1000, time_budget_s=100.0)
    cpu = torch.device("cpu")
    assert steps_within_budget(config, 20, 20, 10.0, cpu) == 200  # 90 s left at 0.5 s a step
    assert steps_within_budget(config, 520, 20, 10.0, cpu) == 700  # resumed at 500: the same pace
    assert steps_within_budget(config, 20, 20, 1.0, cpu) == 1000  # fits: the configured steps
    assert steps_within_budget(config, 20, 20, 150.0, cpu) == 20  # already over: stop here
    schedule = WarmupCosine(1000)
    schedule.total_steps = 200
    assert schedule(199) == pytest.approx(0.0, abs=1e-3)  # the shortened run still anneals to 0
    studies = synthetic_studies(tmp_path)
    result = train(tiny_config(studies, tmp_path / "run", steps=1000, val_every=500, time_budget_s=1e-3))
    assert read_config(result["last"])["step"] == BUDGET_PROBE_STEPS  # over budget after the probe: stopped, validated


def test_ground_glass_lesion_slices_are_drawn_more_often():
    from lungnlb.io.intensity import IntensityMapping
    from lungnlb.training.dataset import SliceSample, weigh_faint_lesions

    mapping = IntensityMapping()
    mask = np.zeros((8, 8), bool)
    mask[2:5, 2:5] = True

    def lesion(hu_inside):
        image = np.full((8, 8), mapping.input_of_hu(-850.0), np.float32)
        image[mask] = mapping.input_of_hu(hu_inside)
        return SliceSample("i", "c", "s", 0, image, mask.copy(), 1)

    ground_glass, solid, tumour_free = lesion(-650.0), lesion(30.0), SliceSample("j", "c", "s", 0, np.zeros((8, 8), np.float32), None, 0)
    assert weigh_faint_lesions([ground_glass, solid, tumour_free], 3.0, mapping) == 1
    assert (ground_glass.weight, solid.weight, tumour_free.weight) == (3.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="faint-lesion-weight"):
        weigh_faint_lesions([solid], 0.0, mapping)
