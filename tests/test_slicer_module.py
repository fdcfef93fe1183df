"""The Slicer module's logic class (slicer_extension/LungNLB/LungNLB.py) on Slicer's real MRML and Segmentations
logic (the `slicer-core` wheel: Slicer's libraries without Qt), against LungNLBLib.testing.FakeServer.

What is real here: the scene, volume / segmentation / slice / markups nodes, Slicer's NIfTI reader (the
Volumes logic), the Segmentations logic (import, export, segment IDs), slicer.util. What is stood in for,
as small as the module allows (slicer_extension/LungNLB/Testing/headless.py): `qt` (the logic uses none of
it), ScriptedLoadableModule's base classes (the parameter node is made as Slicer 5.2 makes it), slicer.app
(a settings path and a layout manager that hands out the Red slice node) and slicer.modules (the two logics). Widgets, the Segment Editor and the
GUI-thread timers are not exercised; the worker threads are, through BackgroundTask.

`slicer-core` is in the `slicer` extra that scripts/setup.sh installs: without it this file fails (the
import below), it does not skip.
"""

import sys
import types
from pathlib import Path

import numpy as np
import pytest

import slicer  # noqa: E402  (slicer-core; `pip install -e .[slicer]`)
import slicer.util  # noqa: E402

from Testing import headless  # slicer_extension/LungNLB/Testing/headless.py: the stand-ins

MODULE_DIR = Path(__file__).resolve().parents[1] / "slicer_extension" / "LungNLB"


@pytest.fixture()
def module(tmp_path, monkeypatch):
    scene, red = headless.install(tmp_path / "settings" / "Slicer.ini")
    sys.modules.pop("LungNLB", None)
    import LungNLB

    yield types.SimpleNamespace(module=LungNLB, scene=scene, red=red)
    sys.modules.pop("LungNLB", None)


from LungNLBLib.testing import FakeImage, FakeServer  # noqa: E402


def _oblique_affine():
    """A series tilted 20 degrees about the R axis and rotated 30 degrees in plane: its slices are not axial."""
    tilt, spin = np.radians(20.0), np.radians(30.0)
    rx = np.array([[1, 0, 0], [0, np.cos(tilt), -np.sin(tilt)], [0, np.sin(tilt), np.cos(tilt)]])
    rz = np.array([[np.cos(spin), -np.sin(spin), 0], [np.sin(spin), np.cos(spin), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rx @ rz @ np.diag([0.7, 0.8, 2.5])
    affine[:3, 3] = [-100.0, -80.0, 40.0]
    return affine


def _images():
    affine = _oblique_affine()
    first = np.full((6, 40, 32), -800, dtype=np.int16)
    first[3, 10:20, 8:16] = 300  # what the fake model calls tumour
    first[1, 5:7, 5:7] = 300
    original = np.zeros(first.shape, np.uint8)
    original[3, 12:18, 10:14] = 1
    second = np.full((4, 24, 20), -700, dtype=np.int16)
    return {"case-1": FakeImage(first, affine, original), "case-2": FakeImage(second, affine)}


def _ras(affine, x, y, z):
    return (affine @ np.array([x, y, z, 1.0]))[:3].tolist()


def test_load_sample_reads_with_slicers_reader_and_shows_image_slices(module):
    images = _images()
    with FakeServer(images) as server:
        logic = module.module.LungNLBLogic()
        logic.connectSession(server.url, "ann")
        files = logic.run(logic.nextSampleJob())
        assert files.image_id == "case-1"
        volume = logic.volumeNode()
        assert volume.GetClassName() == "vtkMRMLScalarVolumeNode"
        assert np.array_equal(slicer.util.arrayFromVolume(volume), images["case-1"].array)
        assert np.allclose(logic.ijkToRas(), images["case-1"].affine, atol=1e-5)
        # the original label became the tumour segment; the temporary label volume is gone
        assert np.array_equal(logic.mask(), images["case-1"].original > 0)
        assert slicer.util.getNodesByClass("vtkMRMLLabelMapVolumeNode") == []
        assert not logic.hasUnsavedEdits()
        # oblique series: the Red view was turned to the image's planes, so it shows image slices
        for z in (0, 3, 5):
            logic.jumpToSlice(z)
            assert logic.currentSliceIndex() == z
        assert server.requests[0]["params"]["client_id"] == "ann"


def test_an_oblique_view_is_not_taken_for_a_slice(module):
    with FakeServer(_images()) as server:
        logic = module.module.LungNLBLogic()
        logic.connectSession(server.url, "ann")
        logic.run(logic.nextSampleJob())
        import vtk

        module.red.GetSliceToRAS().DeepCopy(vtk.vtkMatrix4x4())  # back to axial: it now cuts the series obliquely
        module.red.UpdateMatrices()
        assert logic.currentSliceIndex() is None
        with pytest.raises(ValueError, match="obliquely"):
            logic.segmentCurrentSliceJob()


def test_segment_slice_sends_the_slice_shown_and_volume_fills_the_table(module):
    images = _images()
    with FakeServer(images, model_version="v7") as server:
        logic = module.module.LungNLBLogic()
        logic.connectSession(server.url, "ann")
        logic.run(logic.nextSampleJob())
        logic.jumpToSlice(3)
        logic.run(logic.segmentCurrentSliceJob())
        upload = [r for r in server.requests if r["path"] == "/infer/lung_nlb_seg"][-1]["upload"]
        assert np.array_equal(np.squeeze(upload.array), images["case-1"].array[3])
        assert np.allclose(upload.affine[:3, 3], _ras(images["case-1"].affine, 0, 0, 3), atol=1e-4)
        expected = images["case-1"].array > 100
        mask = logic.mask()
        assert np.array_equal(mask[3], expected[3])
        assert np.array_equal(mask[1], np.zeros_like(mask[1]))  # other slices untouched (no original there)
        assert [row.z for row in logic.rows] == [3] and logic.modelVersion == "v7"
        logic.run(logic.segmentVolumeJob())
        assert np.array_equal(logic.mask(), expected)
        assert [row.z for row in logic.rows] == list(range(6))
        assert logic.hasUnsavedEdits()


def test_renamed_segment_keeps_working_and_a_deleted_one_is_a_clear_error(module):
    with FakeServer(_images()) as server:
        logic = module.module.LungNLBLogic()
        logic.connectSession(server.url, "ann")
        logic.run(logic.nextSampleJob())
        segmentation = logic.segmentationNode().GetSegmentation()
        segmentation.GetSegment(logic.segmentId()).SetName("nodule (reviewed)")  # renamed in the Segment Editor
        logic.jumpToSlice(3)
        logic.run(logic.segmentCurrentSliceJob())
        confirmation = logic.run(logic.submitJob())
        assert confirmation["image"] == "case-1"
        assert server.labels[("case-1", "final")]["array"][3].sum() == 80
        segmentation.RemoveSegment(logic.segmentId())
        for job in (logic.submitJob, logic.segmentVolumeJob, logic.segmentCurrentSliceJob):
            with pytest.raises(module.module.SegmentMissingError, match="deleted"):
                job()


def _image_aligned_roi(scene, affine, x0, y0, x1, y1, z):
    """An ROI drawn along the image's rows and columns (as Slicer draws it in a view rotated to the volume plane)."""
    import vtk

    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    axes = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    matrix = vtk.vtkMatrix4x4()
    for row in range(3):
        for column in range(3):
            matrix.SetElement(row, column, axes[row, column])
    roi.SetAndObserveObjectToNodeMatrix(matrix)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    roi.SetCenterWorld(_ras(affine, (x0 + x1) / 2.0, (y0 + y1) / 2.0, z))
    roi.SetSizeWorld([(x1 - x0 + 1) * spacing[0] * 0.98, (y1 - y0 + 1) * spacing[1] * 0.98, spacing[2]])
    return roi, matrix


def test_watershed_from_placed_unplaced_and_rotated_boxes_and_from_points(module):
    images = _images()
    affine = images["case-1"].affine
    with FakeServer(images) as server:
        logic = module.module.LungNLBLogic()
        logic.connectSession(server.url, "ann")
        logic.run(logic.nextSampleJob())
        logic.jumpToSlice(3)
        roi, matrix = _image_aligned_roi(module.scene, affine, 6, 8, 17, 21, 3)
        mask = logic.run(logic.watershedFromRoiJob(roi))
        request = [r for r in server.requests if r["path"] == "/infer/lung_watershed"][-1]
        assert request["params"]["box"] == [6, 8, 17, 21] and request["params"]["slice"] == 3
        assert mask.sum() == 12 * 14 and np.array_equal(logic.mask()[3], mask)

        unplaced = module.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
        with pytest.raises(ValueError, match="not been placed"):
            logic.watershedFromRoiJob(unplaced)
        with pytest.raises(ValueError, match="select a box"):
            logic.watershedFromRoiJob(None)

        import vtk

        turned = vtk.vtkTransform()
        turned.SetMatrix(matrix)
        turned.RotateZ(25.0)  # about the box's own normal: an in-plane rotation the server cannot take
        rotated = module.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
        rotated.SetAndObserveObjectToNodeMatrix(turned.GetMatrix())
        rotated.SetCenterWorld(_ras(affine, 12, 14, 3))
        rotated.SetSizeWorld([8.0, 8.0, 2.0])
        requests_before = len(server.requests)
        with pytest.raises(ValueError, match="rotated"):
            logic.watershedFromRoiJob(rotated)
        assert len(server.requests) == requests_before  # nothing was sent

        elsewhere, _ = _image_aligned_roi(module.scene, affine, 6, 8, 17, 21, 0)
        with pytest.raises(ValueError, match="not the slice 3 shown"):
            logic.watershedFromRoiJob(elsewhere)

        inside = module.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
        inside.AddControlPoint(_ras(affine, 10, 12, 3))
        outside = module.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
        outside.AddControlPoint(_ras(affine, 11, 12, 3))
        mask = logic.run(logic.watershedFromPointsJob(inside, outside))
        request = [r for r in server.requests if r["path"] == "/infer/lung_watershed"][-1]
        assert request["params"]["foreground"] == [[10, 12]] and request["params"]["background"] == [[11, 12]]
        assert mask.sum() == 8 and not mask[12, 11]
        other_slice = module.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
        other_slice.AddControlPoint(_ras(affine, 11, 12, 2))
        with pytest.raises(ValueError, match="on one slice"):
            logic.watershedFromPointsJob(inside, other_slice)


def test_next_sample_with_unsaved_edits_asks_then_closes_the_previous_sample(module):
    with FakeServer(_images()) as server:
        logic = module.module.LungNLBLogic()
        logic.connectSession(server.url, "ann")
        logic.run(logic.nextSampleJob())
        first_volume, first_segmentation = logic.volumeNode(), logic.segmentationNode()
        edited = logic.mask()
        edited[0, :3, :3] = True  # the annotator's stroke
        logic.setMask(edited)
        assert logic.hasUnsavedEdits()
        with pytest.raises(module.module.UnsavedEditsError, match="not submitted"):
            logic.nextSampleJob()
        assert logic.volumeNode() is first_volume  # nothing changed

        # edits made while the next sample downloads are not thrown away either
        job = logic.nextSampleJob(discardUnsaved=True)
        files = job.work()
        edited[5, :2, :2] = True
        logic.setMask(edited)
        with pytest.raises(module.module.UnsavedEditsError, match="while the next sample downloaded"):
            job.apply(files)
        assert logic.volumeNode() is first_volume

        logic.run(logic.submitJob())
        assert not logic.hasUnsavedEdits()
        files = logic.run(logic.nextSampleJob())
        assert files.image_id == "case-2"
        # the previous sample's nodes left the scene with their display nodes
        assert not module.scene.IsNodePresent(first_volume)
        assert not module.scene.IsNodePresent(first_segmentation)
        assert len(slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")) == 1
        assert len(slicer.util.getNodesByClass("vtkMRMLSegmentationNode")) == 1
        assert len(slicer.util.getNodesByClass("vtkMRMLScalarVolumeDisplayNode")) == 1
        # discarding on purpose
        logic.setMask(np.ones(logic.shape(), bool))
        second_volume = logic.volumeNode()
        files = logic.run(logic.nextSampleJob(discardUnsaved=True))  # case-2 again: it has no final label yet
        assert files.image_id == "case-2" and not module.scene.IsNodePresent(second_volume)
        assert not logic.mask().any() and not logic.hasUnsavedEdits()
        assert len(slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")) == 1


def test_submit_stores_label_annotator_and_reviewed_slices(module):
    images = _images()
    with FakeServer(images) as server:
        logic = module.module.LungNLBLogic()
        logic.connectSession(server.url, "dr-who")
        logic.run(logic.nextSampleJob())
        logic.jumpToSlice(1)
        logic.run(logic.segmentCurrentSliceJob())
        logic.run(logic.submitJob())
        stored = server.labels[("case-1", "final")]
        expected = images["case-1"].original.astype(bool)
        expected[1] = images["case-1"].array[1] > 100
        assert np.array_equal(stored["array"] > 0, expected)
        assert np.allclose(stored["affine"], images["case-1"].affine, atol=1e-4)
        assert stored["params"]["user"] == "dr-who" and stored["params"]["labelled_slices"] == [1, 3]


def test_switching_servers_keeps_pending_labels_for_their_own_server(module, tmp_path):
    images = _images()
    with FakeServer(images) as first:
        logic = module.module.LungNLBLogic()
        logic.connectSession(first.url, "ann")
        logic.run(logic.nextSampleJob())
        first_url = first.url
    # the first server went away before the label was submitted: it is kept locally, for that server
    from LungNLBLib.session import SubmissionPending

    with pytest.raises(SubmissionPending, match="kept locally"):
        logic.run(logic.submitJob())
    assert not logic.hasUnsavedEdits()  # safe on disk: the next sample may replace it
    with FakeServer(images) as second:
        logic.connectSession(second.url, "ann")
        here, elsewhere = logic.pendingSummary()
        assert here == [] and [e.server_url for e in elsewhere] == [first_url]
        assert logic.run(logic.sendPendingJob()) == []
        assert second.labels == {}  # never sent to a server it was not meant for
        logic.discardPending(elsewhere[0])
        assert logic.pendingSummary() == ([], [])
        assert logic.pendingEntries() == []


def test_requests_run_on_a_worker_thread_and_can_be_cancelled(module):
    from LungNLBLib.errors import RequestCancelled
    from LungNLBLib.tasks import BackgroundTask

    with FakeServer(_images()) as server:
        logic = module.module.LungNLBLogic()
        session = logic.connectSession(server.url, "ann")
        logic.run(logic.nextSampleJob())
        job = logic.segmentVolumeJob()
        server.infer_delay.clear()  # the server "computes" until told otherwise
        task = BackgroundTask(job.what, job.work, session.client).start()
        assert not task.done()
        task.cancel()
        assert task.done()
        with pytest.raises(RequestCancelled, match="not used"):
            task.outcome()
        server.infer_delay.set()
        assert task.wait(10)
        assert not logic.hasUnsavedEdits()  # the late answer was not applied


def test_a_slice_result_changes_only_that_slice_without_reimporting_the_segment(module, monkeypatch):
    """Slice results (segment slice, watershed) go into the segment through the Segmentations logic for that
    slice's extent only: the rest of the segment, and another segment sharing its labelmap layer, stay."""
    images = _images()
    with FakeServer(images) as server:
        logic = module.module.LungNLBLogic()
        logic.connectSession(server.url, "ann")
        logic.run(logic.nextSampleJob())
        segmentation = logic.segmentationNode().GetSegmentation()
        vessel = segmentation.AddEmptySegment("vessel", "vessel", [0.2, 0.2, 0.9])
        vessel_mask = np.zeros(logic.shape(), np.uint8)
        vessel_mask[:, 30:34, 2:6] = 1
        slicer.util.updateSegmentBinaryLabelmapFromArray(vessel_mask, logic.segmentationNode(), vessel, logic.volumeNode())
        segmentation.CollapseBinaryLabelmaps(False)  # as the Segment Editor keeps them: one shared layer
        assert segmentation.GetNumberOfLayers() == 1
        before = logic.mask()

        def whole_segment(*args, **kwargs):
            raise AssertionError("the whole segment was exported or imported for one slice")

        monkeypatch.setattr(slicer.util, "updateSegmentBinaryLabelmapFromArray", whole_segment)
        monkeypatch.setattr(slicer.util, "arrayFromSegmentBinaryLabelmap", whole_segment)
        new_slice = np.zeros(logic.shape()[1:], bool)
        new_slice[14:20, 12:16] = True  # overlaps the original label's 12:18 x 10:14 on slice 3 in part
        logic.setSliceMask(3, new_slice)
        logic.setSliceMask(0, new_slice)
        with pytest.raises(ValueError, match="slice mask"):
            logic.setSliceMask(2, new_slice[:, :5])
        monkeypatch.undo()

        expected = before.copy()
        expected[3] = new_slice
        expected[0] = new_slice
        assert np.array_equal(logic.mask(), expected)
        assert logic.reviewedSlices == {0, 3}
        vessel_after = slicer.util.arrayFromSegmentBinaryLabelmap(logic.segmentationNode(), vessel, logic.volumeNode())
        assert np.array_equal(vessel_after > 0, vessel_mask > 0)
        logic.setSliceMask(3, np.zeros_like(new_slice))  # an empty result clears the slice
        assert not logic.mask()[3].any() and logic.mask()[0].sum() == new_slice.sum()
