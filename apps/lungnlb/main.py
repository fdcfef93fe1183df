"""LungNLB MONAI Label app: NLB U-Net segmentation / classification, watershed, active learning.

    bash scripts/serve_sample.sh    # monailabel start_server --app apps/lungnlb --studies runs/sample_studies --conf models all

Wiring only; the parts live in `lib/` (see docs/app.md):

    lib/conf.py                  --conf keys
    lib/model_store.py           current weights, their version, the loaded model
    lib/model_thread.py          the one thread every forward pass runs on
    lib/provenance.py            datastore: checked uploads, write-once original, versioned final labels
    lib/pacs.py                  the same datastore on a PACS over DICOMweb (labels back as DICOM SEG)
    lib/monailabel_private.py    every private member of MONAI Label the app uses, and why
    lib/images.py                request image resolution and checks (4xx with a message)
    lib/server.py                start-up: closed unless authenticated, CORS, Host names, size limits, checked routes
    lib/request_thread.py        the one thread heavy requests run on, so /info and /datastore stay answered
    lib/uploads.py               the server's private folder for uploads and results
    lib/image_cache.py           decoded datastore images kept between infer requests (LRU)
    lib/infers/                  lung_nlb_seg, lung_nlb_cls, lung_watershed
    lib/trainers/                lung_nlb_seg: lungnlb's fine-tuning run, its stats, one run at a time
    lib/activelearning/          scores cached per model version; strategies; images held per annotator
"""

from __future__ import annotations

import copy
import logging
import sys
import threading
from pathlib import Path
from typing import Any

import torch

from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask

from lib.activelearning.scores import SCORING_NAME, ModelScoring, ScoreCache
from lib.activelearning.strategies import FreeRandom, ScoreRankStrategy
from lib.conf import CLS_MODEL, SEG_MODEL, WATERSHED_MODEL, parse_conf
from lib.errors import bad_request, not_found
from lib.image_cache import ImageCache
from lib.images import resolve_image
from lib.infers.classification import NLBClassificationInfer
from lib.infers.segmentation import NLBSegmentationInfer
from lib.infers.watershed import WatershedInfer
from lib.model_store import ModelStore
from lib.pacs import PacsDatastore, cache_dir, is_pacs
from lib.monailabel_private import infer_tasks, strategies
from lib.provenance import ProvenanceDatastore
from lib import uploads
from lib.server import check_exposure, install_server_hooks, listen_host
from lib.trainers.guard import TrainerLock, reclaim_at_startup, stop_training_with_server
from lib.trainers.segmentation import NLBSegmentationTrain
from lib.uploads import use_private_temp_dir

logger = logging.getLogger(__name__)

PROPOSING_MODELS = (SEG_MODEL, WATERSHED_MODEL)


class LungNLBApp(MONAILabelApp):
    """MONAI Label app of the LungNLB project (subclasses MONAILabelApp directly, as discovery requires)."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        # a PACS (DICOMweb URL) is served from a local cache folder, which stands in for the studies folder
        self.app_config = parse_conf(app_dir, cache_dir(studies, conf or {}) if is_pacs(studies) else studies, conf or {})
        self.store = ModelStore(self.app_config)
        self.score_cache = ScoreCache(self.app_config, self.store)
        self.images = ImageCache(int(self.app_config.image_cache_mb * (1 << 20)))
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="LungNLB",
            description="Lung tumour segmentation and classification on CT with specialised non-local blocks",
            version="0.1.0",
            labels={"tumour": 1},
        )

    def init_datastore(self) -> Datastore:
        if is_pacs(self.studies):  # not MONAI Label's own set-up, which downloads dcmqi (lib/pacs.py)
            return PacsDatastore(self.app_config, self.studies, self.conf or {})
        return ProvenanceDatastore(
            self.app_config,
            extensions=("*.nii.gz", "*.nii"),
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self) -> dict[str, InferTask]:
        tasks = {
            SEG_MODEL: lambda: NLBSegmentationInfer(self.app_config, self.store, self.images),
            CLS_MODEL: lambda: NLBClassificationInfer(self.app_config, self.store, self.images),
            WATERSHED_MODEL: lambda: WatershedInfer(self.app_config, self.images),
        }
        return {name: tasks[name]() for name in self.app_config.models}

    def init_trainers(self) -> dict[str, TrainTask]:
        return {SEG_MODEL: NLBSegmentationTrain(self.app_config, self.store)} if SEG_MODEL in self.app_config.models else {}

    def init_strategies(self) -> dict[str, Strategy]:
        return {
            "disagreement": ScoreRankStrategy(
                "disagreement", "Images whose original (watershed) label the model disagrees with most", self.score_cache
            ),
            "uncertainty": ScoreRankStrategy(
                "uncertainty", "Images with the highest predictive entropy inside the lungs", self.score_cache
            ),
            "random": FreeRandom(),
        }

    def init_scoring_methods(self) -> dict[str, ScoringMethod]:
        return {SCORING_NAME: ModelScoring(self.score_cache)}

    def info(self) -> dict[str, Any]:
        meta = super().info()
        weights = self.store.status()
        meta["lungnlb"] = {"weights": weights, "conf": {k: str(v) for k, v in vars(self.app_config).items()}}
        datastore = self.datastore()
        if isinstance(datastore, ProvenanceDatastore):
            meta["lungnlb"]["provenance"] = datastore.provenance_summary()
        warnings = list(getattr(self, "startup_warnings", []))
        if not weights["trained"]:
            warnings.insert(0, weights["message"])
        if warnings:
            meta["warnings"] = warnings
        return meta

    def infer(self, request: dict[str, Any], datastore=None) -> dict[str, Any]:
        """Check the model and the image, run the task, keep segmentation output as a proposal.

        Model output is never saved as a datastore label (an `original` label must stay as it
        was); the mask returned for a datastore image is remembered as its latest proposal, for
        the Dice between proposal and the `final` label submitted later.
        """
        result_file = None
        try:
            model = request.get("model")
            task = infer_tasks(self).get(model)
            if task is None:
                raise not_found(f"no model {model!r}; available: {sorted(infer_tasks(self))}")
            datastore = datastore or self.datastore()
            image_id, path = resolve_image(request.get("image"), datastore, self.app_config, self._session_roots())
            if uploads.is_upload(path) and not uploads.request_has_upload.get():
                raise bad_request("image path names a temporary file of the server, not an upload of this request")
            full = {**copy.deepcopy(task.config()), **copy.deepcopy(request), "image": str(path), "image_id": image_id}
            result_file, result_json = task(full)
            # an attention heat map is a view for the annotator, not a proposed mask
            proposal = result_json.get("attention_slice") is None
            if image_id and result_file and proposal and model in PROPOSING_MODELS and isinstance(datastore, ProvenanceDatastore):
                version = result_json.get("model_version")
                datastore.record_proposal(image_id, Path(result_file), model, version)
        except BaseException:
            # MONAI Label removes the upload and the result only after a successful response
            if uploads.request_has_upload.get():
                uploads.discard(request.get("image"), request.get("label"))
            uploads.discard(result_file)
            raise
        return {"label": result_file, "tag": "proposal", "file": result_file, "params": result_json}

    def _session_roots(self) -> list[Path]:
        sessions = self.sessions()
        return [Path(sessions.store_path)] if sessions is not None else []

    def batch_infer(self, request: dict[str, Any], datastore=None) -> dict[str, Any]:
        """MONAI Label's batch infer, on the CPU where there is no GPU (it spreads the images over
        the CUDA devices it finds, none on a CPU machine). Results are proposals, never labels."""
        if not torch.cuda.is_available():
            request = {**request, "multi_gpu": False, "device": "cpu"}
        return super().batch_infer(request, datastore)

    def next_sample(self, request: dict[str, Any]) -> dict[str, Any]:
        strategy = request.get("strategy") or "random"
        if strategy not in strategies(self):
            raise not_found(f"no active-learning strategy {strategy!r}; available: {sorted(strategies(self))}")
        return super().next_sample(request)

    def on_init_complete(self) -> None:
        """Server start-up (MONAI Label calls this once the app is built, in the server only):
        refuse an exposed unauthenticated server, install the request checks, take over what an
        earlier server left (temporary files, a training run)."""
        check_exposure(listen_host(sys.argv), settings.MONAI_LABEL_AUTH_ENABLE)
        use_private_temp_dir()
        install_server_hooks(self)
        self.startup_warnings = reclaim_at_startup(TrainerLock(self.app_config.state_dir))
        if threading.current_thread() is threading.main_thread():
            stop_training_with_server()
        super().on_init_complete()
        port = settings.MONAI_LABEL_SERVER_PORT
        logger.info(f"LungNLB app ready: in 3D Slicer's MONAI Label module use server http://127.0.0.1:{port}/")
        if self.store.checkpoint_path() is None:
            logger.warning(self.store.status()["message"])
