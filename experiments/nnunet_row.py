"""The peer row of the paper tables: nnU-Net v2, 2d configuration, on the same split, budget and evaluation.

    export the split's slices -> nnU-Net raw dataset -> plan + preprocess (2d, nnU-Net's own plan)
    -> train within the wall-clock budget -> predict the test patients through `lungnlb.evaluation`

Export (`export_dataset`, needs no nnU-Net): the very slices the other segmentation rows train and
validate on (`lungnlb.training.trainer.load_training_set` with the table's recipe: slices with a
lesion mask or tumour-free, through the library's intensity mapping), one 2-D NIfTI per slice with
pixel spacing 1 x 1, so nnU-Net, like the other rows, works at the slices' own pixel size and never
resamples. The channel is declared "zscore", nnU-Net's normalisation for a non-CT channel (the input
is the lung window, not HU). `splits_final.json` makes nnU-Net's fold 0 the table's split: it trains
on the training patients and its best-checkpoint bookkeeping sees only the validation patients
(fold `all` would train on those too).

Budget (`train_within_budget`): nnU-Net's own trainer with shorter epochs (`EPOCH_ITERATIONS`); the
first epoch is timed and the number of epochs, and with it the end of nnU-Net's poly learning-rate
schedule, set to what fits the budget, as the library's engine does with its cosine schedule.
Inference keeps nnU-Net's sliding window with Gaussian weights but no mirroring (the other rows have
no test-time augmentation); a slice is called tumour when its mask is non-empty at 0.5.

nnunetv2 is an optional extra (`pip install '.[nnunet]'`), best in its own environment, so the main one
is left as it is (docs/results.md shows how).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import torch

from lungnlb.evaluation.evaluate import evaluate
from lungnlb.io.intensity import IntensityMapping
from lungnlb.training import TrainConfig, load_split, read_records
from lungnlb.training.dataset import SliceSample

DATASET_ID = 871
DATASET_NAME = f"Dataset{DATASET_ID}_LungNLB"
CONFIGURATION = "2d"
EPOCH_ITERATIONS = 25  # nnU-Net's 250 would not fit one epoch into a CPU budget
VAL_ITERATIONS = 5
THRESHOLD = 0.5


def nnunet_available() -> bool:
    return importlib.util.find_spec("nnunetv2") is not None


def identifier(sample: SliceSample) -> str:
    """nnU-Net's case identifier of one slice: its image id and plane, in the characters nnU-Net accepts."""
    return re.sub(r"[^A-Za-z0-9-]", "-", sample.image_id) + f"_z{sample.z:03d}"


def known_truth(samples: list[SliceSample]) -> list[SliceSample]:
    """The slices whose every pixel has a truth: a non-empty lesion mask, or tumour-free (an empty one)."""
    return [s for s in samples if s.class_label == 0 or (s.mask is not None and s.mask.any())]


def _write(array: np.ndarray, path: Path) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0))
    sitk.WriteImage(image, str(path), useCompression=True)


def export_dataset(train: list[SliceSample], val: list[SliceSample], raw: Path) -> dict[str, list[str]]:
    """Write `train` and `val` slices (those with a known truth) as nnU-Net dataset `DATASET_NAME`
    under `raw`; returns the fold {"train": identifiers, "val": identifiers} for splits_final.json."""
    folder = raw / DATASET_NAME
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    fold: dict[str, list[str]] = {"train": [], "val": []}
    for subset, samples in (("train", train), ("val", val)):
        for sample in known_truth(samples):
            name = identifier(sample)
            mask = np.zeros(sample.image.shape, np.uint8) if sample.mask is None else sample.mask.astype(np.uint8)
            _write(sample.image.astype(np.float32), folder / "imagesTr" / f"{name}_0000.nii.gz")
            _write(mask, folder / "labelsTr" / f"{name}.nii.gz")
            fold[subset].append(name)
    if len(set(fold["train"] + fold["val"])) != len(fold["train"]) + len(fold["val"]):
        raise ValueError("two slices map to one nnU-Net identifier")
    dataset = {"channel_names": {"0": "zscore"}, "labels": {"background": 0, "tumour": 1},
               "numTraining": len(fold["train"]) + len(fold["val"]), "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2), encoding="utf-8")
    return fold


def table_slices(studies: Path, split_path: Path, seed: int, recipe: dict) -> tuple[list[SliceSample], list[SliceSample]]:
    """The training slices and the validation draw of the table's segmentation rows (same loader, same recipe)."""
    from lungnlb.training.trainer import load_training_set

    records = read_records(studies)
    config = TrainConfig(data=str(studies), out="", model="unet", seed=seed, split=str(split_path), progress=False,
                         **recipe)
    data = load_training_set(config, records, load_split(split_path, records), IntensityMapping())
    return data.train, data.val


def use_folders(root: Path) -> None:
    """Point nnU-Net's three folders into `root` (read by nnunetv2 when it is first imported)."""
    for variable, name in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        (root / name).mkdir(parents=True, exist_ok=True)
        os.environ[variable] = str(root / name)


def plan_and_preprocess(workers: int) -> None:
    from nnunetv2.experiment_planning import plan_and_preprocess_api as api

    api.extract_fingerprints([DATASET_ID], num_processes=max(1, workers), check_dataset_integrity=True)
    api.plan_experiments([DATASET_ID])
    api.preprocess([DATASET_ID], configurations=(CONFIGURATION,), num_processes=(max(1, workers),))


def _epoch(trainer) -> None:
    """One nnU-Net epoch, as its `run_training` loop runs it."""
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()
    trainer.on_train_epoch_end([trainer.train_step(next(trainer.dataloader_train))
                                for _ in range(trainer.num_iterations_per_epoch)])
    with torch.no_grad():
        trainer.on_validation_epoch_start()
        trainer.on_validation_epoch_end([trainer.validation_step(next(trainer.dataloader_val))
                                         for _ in range(trainer.num_val_iterations_per_epoch)])
    trainer.on_epoch_end()


def train_within_budget(trainer, seconds: float) -> int:
    """Train `trainer` for as many epochs as `seconds` allow at its first epoch's pace; the epochs run."""
    trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = EPOCH_ITERATIONS, VAL_ITERATIONS
    trainer.on_train_start()
    started = time.monotonic()
    while trainer.current_epoch < trainer.num_epochs:
        _epoch(trainer)
        if trainer.current_epoch == 1:
            trainer.num_epochs = trainer.lr_scheduler.max_steps = max(1, int(seconds / (time.monotonic() - started)))
    trainer.on_train_end()
    return trainer.current_epoch


class NnUNetSlices:
    """`lungnlb.evaluation.evaluate`'s predictor interface over a trained nnU-Net: the library's
    intensity mapping, nnU-Net's prediction per slice, slice probability = the mask's maximum."""

    threshold = THRESHOLD

    def __init__(self, predictor, mapping: IntensityMapping) -> None:
        self.predictor, self.mapping = predictor, mapping
        self.config = {"slice_size": 0}  # a crop is predicted as it is: nnU-Net trained on the crops themselves

    def model_input(self, array: np.ndarray, intensity: str) -> np.ndarray:
        return self.mapping(np.array(array, dtype=np.float32), intensity)

    def air(self) -> float:
        return self.mapping.air()

    def predict_normalized(self, volume: np.ndarray, intensity: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """As `lungnlb.inference.Predictor.predict_normalized` without a slice probe (``intensity`` unused)."""
        probability = np.empty(volume.shape, np.float32)
        for index, plane in enumerate(volume):
            _, probabilities = self.predictor.predict_single_npy_array(
                plane[None, None].astype(np.float32), {"spacing": [999.0, 1.0, 1.0]}, None, None, True)
            probability[index] = probabilities[1, 0]
        return probability, probability.reshape(len(volume), -1).max(axis=1, initial=0.0)


def trained_predictor(trainer, device: torch.device):
    """nnU-Net's predictor over the trainer's final weights (as its own final validation builds it,
    deep supervision off), with those weights as its one parameter set."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    trainer.set_deep_supervision_enabled(False)
    predictor = nnUNetPredictor(use_mirroring=False, device=device, allow_tqdm=False)
    predictor.manual_initialization(trainer.network, trainer.plans_manager, trainer.configuration_manager,
                                    [trainer.network.state_dict()],
                                    trainer.dataset_json, trainer.__class__.__name__,
                                    trainer.inference_allowed_mirroring_axes)
    return predictor


def run_nnunet(studies: Path, split_path: Path, test_ids: list[str], seed: int, budget: dict, out: Path,
               recipe: dict) -> dict:
    """Export, plan, preprocess, train within `budget["seconds"]`, evaluate: the row's run record
    (without row, seed and stamp), with the figures `experiments.paper_tables.scored` keeps. torch's
    thread count, which nnU-Net's planner changes, is restored for the rows that run after it."""
    if not nnunet_available():
        raise RuntimeError("nnunetv2 is not installed: pip install '.[nnunet]' (in its own environment)")
    threads = torch.get_num_threads()
    try:
        return _run_nnunet(studies, split_path, test_ids, seed, budget, out, recipe)
    finally:
        torch.set_num_threads(threads)


def _run_nnunet(studies: Path, split_path: Path, test_ids: list[str], seed: int, budget: dict, out: Path,
                recipe: dict) -> dict:
    from experiments.paper_tables import load_average, scored

    started, cpu_started = time.perf_counter(), time.process_time()
    use_folders(out)
    os.environ.setdefault("nnUNet_n_proc_DA", str(max(1, budget["workers"])))  # its planner sets torch's threads to it
    os.environ.setdefault("nnUNet_compile", "f")  # the other rows are not compiled either
    torch.manual_seed(seed)
    np.random.seed(seed)
    fold = export_dataset(*table_slices(studies, split_path, seed, recipe), Path(os.environ["nnUNet_raw"]))
    plan_and_preprocess(budget["workers"])
    preprocessed = Path(os.environ["nnUNet_preprocessed"]) / DATASET_NAME
    (preprocessed / "splits_final.json").write_text(json.dumps([fold]), encoding="utf-8")
    from nnunetv2.run.run_training import get_trainer_from_args

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    trainer = get_trainer_from_args(DATASET_NAME, CONFIGURATION, 0, device=device)
    epochs = train_within_budget(trainer, budget["seconds"])
    trained, cpu = time.perf_counter() - started, time.process_time() - cpu_started  # with export, plan, preprocess
    report, _ = evaluate(studies, NnUNetSlices(trained_predictor(trainer, device), IntensityMapping()), test_ids,
                         n_bootstrap=0)
    plan = trainer.configuration_manager
    return {"model": f"nnU-Net v2 {CONFIGURATION}, fold 0 = the table's split",
            "input": f"{plan.patch_size[0]} x {plan.patch_size[1]} px patches", "batch_size": plan.batch_size, "epochs": epochs,
            "steps": epochs * EPOCH_ITERATIONS, "train_seconds": round(trained, 1), "train_cpu_seconds": round(cpu, 1),
            "seconds": round(time.perf_counter() - started, 1), "load_average": load_average(), **scored(report)}
