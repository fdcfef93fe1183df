"""LungNLB: annotate lung tumours in 3D Slicer with a MONAI Label server running the LungNLB app.

This file is the Slicer side only (widgets, MRML nodes); the workflow, the HTTP client and the file
formats live in LungNLBLib (pure Python, tested outside Slicer).

Threads: every server request runs on a worker thread (LungNLBLib.tasks.BackgroundTask) and only returns
plain data; the logic's ``Job.apply`` then changes the scene on the GUI thread. The logic never touches
widgets, so tests drive it on Slicer's MRML without Qt (tests/test_slicer_module.py).
"""

import hashlib
import logging
import os
import tempfile
import time
import traceback
from typing import Any, Callable, NamedTuple

import numpy as np
import qt
import slicer
import vtk
import vtk.util.numpy_support
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from LungNLBLib.client import Credentials, MonaiLabelClient
from LungNLBLib.errors import ClientError, RequestCancelled
from LungNLBLib.geometry import extract_slice, points_to_pixels, roi_to_pixel_box, slice_normal_alignment
from LungNLBLib.nifti import Volume
from LungNLBLib.probability import merge_rows, probability_at
from LungNLBLib.session import (
    DEFAULT_STRATEGY,
    AnnotationSession,
    Sample,
    SubmissionPending,
    describe_training,
    training_active,
)
from LungNLBLib.tasks import BackgroundTask

SETTINGS_PREFIX = "LungNLB/"
DEFAULT_SERVER_URL = "http://127.0.0.1:8000"
SEGMENT_ID = "tumour"  # the segment's ID never changes when the annotator renames the segment
SEGMENT_NAME = "tumour"
TRAIN_POLL_MS = 2000
TASK_POLL_MS = 100
ALIGNED = 0.9999  # |cos| between the Red view's normal and the image's slice axis for "showing image slices"


class LungNLB(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "LungNLB"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["LungNLB project"]
        self.parent.helpText = (
            "Annotate lung tumours on CT with a MONAI Label server running the LungNLB app: fetch the next "
            "sample, segment a slice or the volume with the non-local-block U-Net, draw a box or place points "
            "for the watershed, refine in the Segment Editor, submit, and retrain."
        )
        self.parent.acknowledgementText = (
            "Method: Samarin, Toropov et al., 'Specialized Non-local Blocks for Recognizing Tumors on Computed "
            "Tomography Snapshots of Human Lungs'. Built on MONAI Label and 3D Slicer."
        )


class UnsavedEditsError(ValueError):
    """The current sample's segment differs from what was loaded or last submitted."""


class SegmentMissingError(ValueError):
    """The sample's segmentation node or its tumour segment is gone from the scene."""


class Job(NamedTuple):
    """One server action: ``work()`` talks to the server (any thread, no scene access), ``apply(result)``
    changes the scene (GUI thread) and returns what the caller shows."""

    what: str
    work: Callable[[], Any]
    apply: Callable[[Any], Any]


#
# Widget
#


class LungNLBWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.task = None  # the running BackgroundTask (one at a time)
        self.job = None
        self.then = None
        self.taskTimer = None
        self.trainTimer = None
        self.trainPoll = None
        self.trainClient = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LungNLB.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LungNLBLogic()

        settings = qt.QSettings()
        self.ui.serverUrlLineEdit.text = settings.value(SETTINGS_PREFIX + "serverUrl", DEFAULT_SERVER_URL)
        self.ui.annotatorLineEdit.text = settings.value(SETTINGS_PREFIX + "annotator", "")
        self.ui.usernameLineEdit.text = settings.value(SETTINGS_PREFIX + "username", "")
        self.ui.caBundlePathLineEdit.currentPath = settings.value(SETTINGS_PREFIX + "caBundle", "")
        self.ui.probabilityTable.setColumnCount(3)
        self.ui.probabilityTable.setHorizontalHeaderLabels(["Slice", "p(tumour)", "Mask pixels"])
        for selector, placeWidget in (
            (self.ui.roiSelector, self.ui.roiPlaceWidget),
            (self.ui.pointsSelector, self.ui.pointsPlaceWidget),
            (self.ui.backgroundPointsSelector, self.ui.backgroundPlaceWidget),
        ):
            selector.setMRMLScene(slicer.mrmlScene)
            placeWidget.setMRMLScene(slicer.mrmlScene)
            selector.connect("currentNodeChanged(vtkMRMLNode*)", placeWidget.setCurrentNode)

        self.ui.connectButton.connect("clicked(bool)", self.onConnect)
        self.ui.nextSampleButton.connect("clicked(bool)", self.onNextSample)
        self.ui.segmentSliceButton.connect("clicked(bool)", self.onSegmentSlice)
        self.ui.segmentVolumeButton.connect("clicked(bool)", self.onSegmentVolume)
        self.ui.watershedBoxButton.connect("clicked(bool)", self.onWatershedBox)
        self.ui.watershedPointsButton.connect("clicked(bool)", self.onWatershedPoints)
        self.ui.attentionCheckBox.connect("toggled(bool)", self.onAttentionToggled)
        self.ui.editButton.connect("clicked(bool)", self.onEdit)
        self.ui.submitButton.connect("clicked(bool)", self.onSubmit)
        self.ui.sendPendingButton.connect("clicked(bool)", self.onSendPending)
        self.ui.discardPendingButton.connect("clicked(bool)", self.onDiscardPending)
        self.ui.trainButton.connect("clicked(bool)", self.onTrain)
        self.ui.stopTrainingButton.connect("clicked(bool)", self.onStopTraining)
        self.ui.cancelRequestButton.connect("clicked(bool)", self.onCancelRequest)
        self.ui.probabilityTable.connect("cellDoubleClicked(int,int)", self.onTableRowDoubleClicked)

        self.taskTimer = qt.QTimer()
        self.taskTimer.setInterval(TASK_POLL_MS)
        self.taskTimer.connect("timeout()", self.onTaskPoll)
        self.trainTimer = qt.QTimer()
        self.trainTimer.setInterval(TRAIN_POLL_MS)
        self.trainTimer.connect("timeout()", self.onTrainPoll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        sliceNode = self.logic.sliceNode()
        if sliceNode is not None:
            self.addObserver(sliceNode, vtk.vtkCommand.ModifiedEvent, self.onSliceChanged)
        self.updatePendingLabel()
        self.updateButtons()

    def cleanup(self):
        self.removeObservers()
        for timer in (self.taskTimer, self.trainTimer):
            if timer is not None:
                timer.stop()
        if self.task is not None:
            self.task.cancel()

    def onSceneEndClose(self, caller, event):
        if self.logic is not None:
            self.logic.forgetSample()
        self.updateTable()
        self.updateButtons()

    # -- running jobs off the GUI thread ------------------------------------------------------------------

    def startJob(self, job, then=None):
        """Run ``job.work`` on a worker thread; ``job.apply`` and ``then(result)`` run here once it is done."""
        if self.task is not None:
            slicer.util.infoDisplay("'{}' is still running: wait for it or cancel it first.".format(self.task.what))
            return
        client = self.logic.session.client if self.logic.session is not None else None
        self.job, self.then = job, then
        self.task = BackgroundTask(job.what, job.work, client).start()
        self.ui.statusLabel.text = job.what + "..."
        self.ui.requestProgressBar.setRange(0, 0)  # busy until the answer's size is known
        self.ui.requestProgressBar.visible = True
        self.ui.cancelRequestButton.visible = True
        self.updateButtons()
        self.taskTimer.start()

    def onTaskPoll(self):
        task = self.task
        if task is None:
            self.taskTimer.stop()
            return
        done, total = task.progress
        if total:
            self.ui.requestProgressBar.setRange(0, 100)
            self.ui.requestProgressBar.value = int(100 * done / total)
        if not task.done():
            return
        self.taskTimer.stop()
        job, then = self.job, self.then
        self.task = self.job = self.then = None
        self.ui.requestProgressBar.visible = False
        self.ui.cancelRequestButton.visible = False
        try:
            result = job.apply(task.outcome())
            self.ui.statusLabel.text = job.what + ": done"
            if then is not None:
                then(result)
        except Exception as error:
            self.showError(job.what, error)
        finally:
            self.updatePendingLabel()
            self.updateButtons()

    def onCancelRequest(self):
        if self.task is not None:
            self.task.cancel()

    def guarded(self, what, action):
        """Run a GUI-thread action (preparing a job); errors are shown in words, never left in the console only."""
        try:
            return action()
        except Exception as error:
            self.showError(what, error)
            return None

    def showError(self, what, error):
        if isinstance(error, RequestCancelled):
            self.ui.statusLabel.text = what + ": cancelled"
            return
        self.ui.statusLabel.text = what + ": failed"
        if isinstance(error, (ClientError, ValueError, OSError)):
            slicer.util.errorDisplay("{} failed.\n\n{}".format(what, error))
        else:  # a bug: say so, with the details for the report
            logging.error("%s failed:\n%s", what, traceback.format_exc())
            slicer.util.errorDisplay(
                "{} failed with an unexpected error ({}: {}).".format(what, error.__class__.__name__, error),
                detailedText=traceback.format_exc(),
            )

    # -- panel state --------------------------------------------------------------------------------------

    def session(self):
        settings = qt.QSettings()
        url = self.ui.serverUrlLineEdit.text.strip()
        annotator = self.ui.annotatorLineEdit.text.strip()
        username = self.ui.usernameLineEdit.text.strip()
        caBundle = self.ui.caBundlePathLineEdit.currentPath.strip()
        settings.setValue(SETTINGS_PREFIX + "serverUrl", url)
        settings.setValue(SETTINGS_PREFIX + "annotator", annotator)
        settings.setValue(SETTINGS_PREFIX + "username", username)  # the password and token are never saved
        settings.setValue(SETTINGS_PREFIX + "caBundle", caBundle)
        credentials = Credentials(username, self.ui.passwordLineEdit.text, self.ui.tokenLineEdit.text.strip())
        return self.logic.connectSession(
            url, annotator, timeout=float(self.ui.timeoutSpinBox.value), credentials=credentials, caBundle=caBundle
        )

    def updateButtons(self):
        idle = self.task is None
        hasSample = self.logic is not None and self.logic.hasSample()
        for button in (
            self.ui.segmentSliceButton,
            self.ui.segmentVolumeButton,
            self.ui.watershedBoxButton,
            self.ui.watershedPointsButton,
            self.ui.submitButton,
        ):
            button.enabled = hasSample and idle
        self.ui.editButton.enabled = hasSample
        self.ui.attentionCheckBox.enabled = hasSample and idle
        for button in (self.ui.connectButton, self.ui.nextSampleButton, self.ui.trainButton, self.ui.stopTrainingButton):
            button.enabled = idle

    def updatePendingLabel(self):
        here, elsewhere = self.logic.pendingSummary() if self.logic is not None else ([], [])
        text = "{} label(s) kept locally for this server, not yet confirmed".format(len(here))
        if elsewhere:
            text += "; {} kept for other servers (connect there to send them, or discard)".format(len(elsewhere))
        self.ui.pendingLabel.text = text
        self.ui.sendPendingButton.enabled = bool(here) and self.task is None
        self.ui.discardPendingButton.enabled = bool(here or elsewhere)

    def updateTable(self):
        rows = self.logic.rows if self.logic is not None else []
        table = self.ui.probabilityTable
        table.setRowCount(len(rows))
        for index, row in enumerate(rows):
            for column, text in enumerate((str(row.z), "{:.3f}".format(row.probability), str(max(row.mask_pixels, 0)))):
                item = qt.QTableWidgetItem(text)
                item.setFlags(qt.Qt.ItemIsSelectable | qt.Qt.ItemIsEnabled)
                table.setItem(index, column, item)
        self.ui.modelVersionLabel.text = self.logic.modelVersion or "not used yet"
        self.onSliceChanged()

    def onSliceChanged(self, caller=None, event=None):
        """Show the current slice's tumour probability in the panel and in the Red view's corner."""
        if self.logic is None or not self.logic.hasSample():
            self.ui.currentSliceLabel.text = ""
            return
        z = self.logic.currentSliceIndex()
        if z is None:
            text = "the Red view does not show a slice of the image"
        else:
            probability = probability_at(self.logic.rows, z)
            text = "slice {}: p(tumour) = {}".format(z, "{:.3f}".format(probability) if probability is not None else "not segmented")
        self.ui.currentSliceLabel.text = text
        layoutManager = slicer.app.layoutManager()
        if layoutManager is not None:
            view = layoutManager.sliceWidget("Red").sliceView()
            view.cornerAnnotation().SetText(vtk.vtkCornerAnnotation.UpperRight, text)
            view.forceRender()

    # -- actions ------------------------------------------------------------------------------------------

    def onConnect(self):
        def prepare():
            session = self.session()

            def apply(summary):
                self.ui.strategyComboBox.clear()
                for name in summary.strategies:
                    self.ui.strategyComboBox.addItem(name)
                if DEFAULT_STRATEGY in summary.strategies:
                    self.ui.strategyComboBox.currentText = DEFAULT_STRATEGY
                self.ui.serverInfoLabel.text = "{}: models {}; trainers {}".format(
                    summary.name, ", ".join(summary.models) or "none", ", ".join(summary.trainers) or "none"
                )
                warnings = summary.info.get("warnings") or []
                if warnings:
                    self.ui.serverInfoLabel.text += "\n" + "\n".join(str(w) for w in warnings)
                self.ui.trainStatusLabel.text = describe_training(summary.train_status)
                return summary

            self.startJob(Job("Connect", session.connect, apply))

        self.guarded("Connect", prepare)

    def onNextSample(self):
        strategy = self.ui.strategyComboBox.currentText or DEFAULT_STRATEGY

        def prepare():
            if self.logic.session is None:
                self.session()
            try:
                job = self.logic.nextSampleJob(strategy)
            except UnsavedEditsError as error:
                choice = self.askUnsaved(str(error))
                if choice == "save":
                    self.startJob(self.logic.submitJob(), then=lambda result: self.onNextSample())
                    return
                if choice != "discard":
                    return
                job = self.logic.nextSampleJob(strategy, discardUnsaved=True)
            self.startJob(job, then=self.afterSampleLoaded)

        self.guarded("Next sample", prepare)

    def askUnsaved(self, message):
        box = qt.QMessageBox(slicer.util.mainWindow())
        box.setWindowTitle("LungNLB: unsaved label")
        box.setIcon(qt.QMessageBox.Warning)
        box.setText(message)
        box.setInformativeText("Submit it before the next sample, discard it, or stay on this sample?")
        box.setStandardButtons(qt.QMessageBox.Save | qt.QMessageBox.Discard | qt.QMessageBox.Cancel)
        box.setDefaultButton(qt.QMessageBox.Save)
        answer = box.exec_()
        return {qt.QMessageBox.Save: "save", qt.QMessageBox.Discard: "discard"}.get(answer, "cancel")

    def afterSampleLoaded(self, files):
        if files is None:
            slicer.util.infoDisplay("The strategy has no image left to label.")
            return
        self.ui.sampleLabel.text = files.image_id
        slicer.util.setSliceViewerLayers(background=self.logic.volumeNode(), foreground=None, fit=True)
        self.logic.rotateSliceViewsToVolume()
        self.setEditorNodes(select=False)
        self.updateTable()

    def onSegmentSlice(self):
        self.guarded("Segment current slice", lambda: self.startJob(self.logic.segmentCurrentSliceJob(), then=lambda r: self.updateTable()))

    def onSegmentVolume(self):
        self.guarded("Segment volume", lambda: self.startJob(self.logic.segmentVolumeJob(), then=lambda r: self.updateTable()))

    def onWatershedBox(self):
        self.guarded(
            "Watershed from box", lambda: self.startJob(self.logic.watershedFromRoiJob(self.ui.roiSelector.currentNode()))
        )

    def onWatershedPoints(self):
        self.guarded(
            "Watershed from points",
            lambda: self.startJob(
                self.logic.watershedFromPointsJob(self.ui.pointsSelector.currentNode(), self.ui.backgroundPointsSelector.currentNode())
            ),
        )

    def onAttentionToggled(self, checked):
        if not checked:
            self.logic.hideAttention()
            return
        self.guarded("Attention map", lambda: self.startJob(self.logic.attentionJob()))

    def onEdit(self):
        self.guarded("Segment Editor", lambda: self.setEditorNodes(select=True))

    def setEditorNodes(self, select=True):
        if select:
            slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(self.logic.segmentationNode())
        if hasattr(editor, "setSourceVolumeNode"):
            editor.setSourceVolumeNode(self.logic.volumeNode())
        else:  # Slicer < 5.4
            editor.setMasterVolumeNode(self.logic.volumeNode())

    def onSubmit(self):
        def shown(confirmation):
            self.ui.statusLabel.text = "Label of {} saved on the server ({})".format(
                confirmation.get("image", ""), confirmation.get("tag", confirmation.get("label", "final"))
            )

        self.guarded("Submit label", lambda: self.startJob(self.logic.submitJob(), then=shown))

    def onSendPending(self):
        self.guarded("Send pending labels", lambda: self.startJob(self.logic.sendPendingJob()))

    def onDiscardPending(self):
        def discard():
            entries = self.logic.pendingEntries()
            if not entries:
                return
            names = [
                "{} for {} (kept {})".format(
                    entry.image_id, entry.server_url or "an unrecorded server", time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.created))
                )
                for entry in entries
            ]
            name = qt.QInputDialog.getItem(slicer.util.mainWindow(), "Discard a pending label", "Label to discard:", names, 0, False)
            if not name or name not in names:
                return
            if slicer.util.confirmYesNoDisplay("Delete the local copy of the label '{}'? It cannot be sent afterwards.".format(name)):
                self.logic.discardPending(entries[names.index(name)])
            self.updatePendingLabel()

        self.guarded("Discard pending label", discard)

    def onTrain(self):
        def prepare():
            if self.logic.session is None:
                self.session()
            self.trainClient = self.logic.session.client.copy()  # polls run beside other requests
            self.startJob(self.logic.startTrainingJob(int(self.ui.epochsSpinBox.value)), then=lambda r: self.trainTimer.start())

        self.guarded("Train", prepare)

    def onStopTraining(self):
        def prepare():
            if self.logic.session is None:
                self.session()
            self.startJob(self.logic.stopTrainingJob(), then=lambda status: self.onTrainPoll())

        self.guarded("Stop training", prepare)

    def onTrainPoll(self):
        if self.trainPoll is not None and not self.trainPoll.done():
            return
        if self.trainPoll is not None:
            try:
                status = self.trainPoll.outcome()
                self.ui.trainStatusLabel.text = describe_training(status)
                if not training_active(status):
                    self.trainTimer.stop()
            except ClientError as error:
                self.ui.trainStatusLabel.text = "cannot read training progress: {}".format(error)
            self.trainPoll = None
            return
        if self.trainClient is None:
            self.trainTimer.stop()
            return
        client = self.trainClient
        self.trainPoll = BackgroundTask("training status", client.train_status, client).start()

    def onTableRowDoubleClicked(self, row, column):
        z = int(self.ui.probabilityTable.item(row, 0).text())
        self.logic.jumpToSlice(z)


#
# Logic: Slicer nodes <-> LungNLBLib arrays
#


class LungNLBLogic(ScriptedLoadableModuleLogic):
    """The current sample's nodes (kept as references in the module's parameter node) and the server jobs.

    Each ``...Job()`` method checks its inputs on the calling (GUI) thread and returns a Job; ``run(job)``
    does both halves at once (tests, the self-test and scripts).
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.session = None
        self.imageId = ""
        self.info = {}
        self.rows = []
        self.reviewedSlices = set()
        self.savedDigest = None
        self.modelVersion = ""

    @staticmethod
    def run(job):
        return job.apply(job.work())

    # -- session and pending labels -----------------------------------------------------------------------

    @staticmethod
    def pendingFolder():
        settingsDir = os.path.dirname(slicer.app.slicerUserSettingsFilePath)
        return os.path.join(settingsDir, "LungNLB", "pending")

    def connectSession(self, url, annotator, timeout=30.0, credentials=None, caBundle=""):
        client = MonaiLabelClient(url, timeout=timeout, credentials=credentials, ca_bundle=caBundle, client_id=annotator)
        self.session = AnnotationSession(client, annotator, self.pendingFolder())
        return self.session

    def requireSession(self):
        if self.session is None:
            raise ValueError("connect to a server first")
        return self.session

    def pendingEntries(self):
        from LungNLBLib.pending import PendingStore

        return PendingStore(self.pendingFolder()).list()

    def pendingSummary(self):
        """(labels kept for the connected server, labels kept for other servers)."""
        if self.session is None:
            return [], self.pendingEntries()
        return self.session.pending_here(), self.session.pending_elsewhere()

    def discardPending(self, entry):
        from LungNLBLib.pending import PendingStore

        PendingStore(self.pendingFolder()).discard(entry)

    def sendPendingJob(self):
        session = self.requireSession()

        def apply(outcome):
            done, errors = outcome
            if errors:
                raise ValueError("{} sent, {} still pending:\n{}".format(len(done), len(errors), "\n".join(errors)))
            return done

        return Job("Send pending labels", session.submit_pending, apply)

    # -- the sample's nodes -------------------------------------------------------------------------------

    def volumeNode(self):
        return self.getParameterNode().GetNodeReference("Volume")

    def segmentationNode(self):
        return self.getParameterNode().GetNodeReference("Segmentation")

    def attentionNode(self):
        return self.getParameterNode().GetNodeReference("Attention")

    def hasSample(self):
        return bool(self.imageId) and self.volumeNode() is not None

    def forgetSample(self):
        """Drop the sample's state (the scene was closed: its nodes are gone already)."""
        self.imageId = ""
        self.info = {}
        self.rows = []
        self.reviewedSlices = set()
        self.savedDigest = None

    def closeSample(self):
        """Remove the sample's volume, segmentation and attention map from the scene, then forget it."""
        parameterNode = self.getParameterNode()
        for role in ("Attention", "Segmentation", "Volume"):
            _removeNode(parameterNode.GetNodeReference(role))
            parameterNode.SetNodeReferenceID(role, None)
        self.forgetSample()

    def ijkToRas(self, volumeNode=None):
        matrix = vtk.vtkMatrix4x4()
        (volumeNode or self.volumeNode()).GetIJKToRASMatrix(matrix)
        return slicer.util.arrayFromVTKMatrix(matrix)

    def shape(self):
        return slicer.util.arrayFromVolume(self.volumeNode()).shape

    def requestSample(self):
        """The sample as the session takes it; the voxels are a view on the volume node (no copy)."""
        if not self.hasSample():
            raise ValueError("load a sample first (Next sample)")
        image = Volume(slicer.util.arrayFromVolume(self.volumeNode()), self.ijkToRas())
        return Sample(self.imageId, image, None, self.info)

    def segmentId(self):
        """The tumour segment's ID; it survives renaming. SegmentMissingError when it was deleted."""
        segmentationNode = self.segmentationNode()
        if segmentationNode is None:
            raise SegmentMissingError(
                "the sample's segmentation was deleted from the scene; load the sample again to annotate it"
            )
        segmentation = segmentationNode.GetSegmentation()
        segmentId = self.getParameterNode().GetParameter("SegmentID") or SEGMENT_ID
        if segmentation.GetSegment(segmentId) is not None:
            return segmentId
        byName = segmentation.GetSegmentIdBySegmentName(SEGMENT_NAME)
        if byName:  # deleted, then a new segment named like the original: use that one from now on
            self.getParameterNode().SetParameter("SegmentID", byName)
            return byName
        raise SegmentMissingError(
            "the tumour segment of '{}' was deleted. Undo the deletion in the Segment Editor (Ctrl+Z) or add a "
            "segment named '{}' and draw the label in it".format(segmentationNode.GetName(), SEGMENT_NAME)
        )

    def mask(self):
        """The tumour segment as a bool (Z, Y, X) array on the image grid."""
        array = slicer.util.arrayFromSegmentBinaryLabelmap(self.segmentationNode(), self.segmentId(), self.volumeNode())
        return np.asarray(array) > 0

    def setMask(self, mask):
        slicer.util.updateSegmentBinaryLabelmapFromArray(
            np.asarray(mask, dtype=np.uint8), self.segmentationNode(), self.segmentId(), self.volumeNode()
        )

    def setSliceMask(self, z, sliceMask):
        """Replace slice ``z`` of the tumour segment, leaving the other slices as they are.

        Only that slice goes through the Segmentations logic: a one-slice labelmap in the image's geometry,
        merged into the segment with ``SetBinaryLabelmapToSegment`` within the slice's extent, first by minimum
        (clears what the new mask leaves out), then by maximum (adds the new mask), as the Segment Editor's
        effects modify a segment. The whole segment is neither exported nor imported again (which takes long on
        a big volume); replace mode would not do, it replaces the whole segment by the slice.
        """
        volumeNode = self.volumeNode()
        depth, height, width = self.shape()
        sliceMask = np.asarray(sliceMask)
        if sliceMask.shape != (height, width):
            raise ValueError("the slice mask is {}, the image's slices are {}".format(sliceMask.shape, (height, width)))
        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
        labelmap = slicer.vtkOrientedImageData()
        labelmap.SetImageToWorldMatrix(ijkToRas)
        labelmap.SetExtent(0, width - 1, 0, height - 1, int(z), int(z))
        labelmap.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        voxels = vtk.util.numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())
        voxels[:] = (sliceMask > 0).astype(np.uint8).ravel()  # x fastest, as the slice's rows
        labelmap.Modified()
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        segmentationNode, segmentId = self.segmentationNode(), self.segmentId()
        for mode in (logic.MODE_MERGE_MIN, logic.MODE_MERGE_MAX):
            if not logic.SetBinaryLabelmapToSegment(labelmap, segmentationNode, segmentId, mode, labelmap.GetExtent()):
                raise ValueError("Slicer could not set slice {} of the tumour segment".format(z))
        self.reviewedSlices.add(int(z))

    def hasUnsavedEdits(self):
        """Whether the segment differs from what was loaded or last submitted (False when it was deleted)."""
        if not self.hasSample():
            return False
        try:
            return _digest(self.mask()) != self.savedDigest
        except SegmentMissingError:
            return False

    # -- views --------------------------------------------------------------------------------------------

    @staticmethod
    def sliceNode(viewName="Red"):
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:
            return None
        widget = layoutManager.sliceWidget(viewName)
        return widget.mrmlSliceNode() if widget is not None else None

    def rotateSliceViewsToVolume(self):
        """Turn every slice view to the image's own planes, so that the Red view shows image slices (oblique series)."""
        volumeNode = self.volumeNode()
        for sliceNode in slicer.util.getNodesByClass("vtkMRMLSliceNode"):
            sliceNode.RotateToVolumePlane(volumeNode)

    def currentSliceIndex(self, viewName="Red"):
        """The k index of the image slice the view shows; None when it is off the image or cuts it obliquely."""
        if not self.hasSample():
            return None
        sliceNode = self.sliceNode(viewName)
        if sliceNode is None:
            return None
        sliceToRas = slicer.util.arrayFromVTKMatrix(sliceNode.GetSliceToRAS())
        ijkToRas = self.ijkToRas()
        if slice_normal_alignment(ijkToRas, sliceToRas) < ALIGNED:
            return None
        k = int(round((np.linalg.inv(ijkToRas) @ np.append(sliceToRas[:3, 3], 1.0))[2]))
        return k if 0 <= k < self.shape()[0] else None

    def requireSlice(self):
        z = self.currentSliceIndex()
        if z is not None:
            return z
        sliceNode = self.sliceNode()
        if sliceNode is not None and self.hasSample():
            alignment = slice_normal_alignment(self.ijkToRas(), slicer.util.arrayFromVTKMatrix(sliceNode.GetSliceToRAS()))
            if alignment < ALIGNED:
                raise ValueError(
                    "the Red view cuts the image obliquely, so it shows no slice of the image: use 'Rotate to volume "
                    "plane' in the Red view's menu (pin icon), then pick the slice"
                )
        raise ValueError("the Red slice view is not on a slice of the sample; scroll onto the image first")

    def jumpToSlice(self, z, viewName="Red"):
        depth, height, width = self.shape()
        ras = self.ijkToRas() @ np.array([(width - 1) / 2.0, (height - 1) / 2.0, float(z), 1.0])
        sliceNode = self.sliceNode(viewName)
        if sliceNode is not None:
            sliceNode.JumpSliceByCentering(float(ras[0]), float(ras[1]), float(ras[2]))

    # -- loading ------------------------------------------------------------------------------------------

    def nextSampleJob(self, strategy=DEFAULT_STRATEGY, discardUnsaved=False):
        """Ask the strategy for the next image and load it; UnsavedEditsError first if the current label changed."""
        session = self.requireSession()
        if self.hasUnsavedEdits() and not discardUnsaved:
            raise UnsavedEditsError(
                "the label of {} has changes that were not submitted; the next sample replaces it".format(self.imageId)
            )
        digestBefore = _digest(self.mask()) if self.hasSample() and not self._segmentMissing() else None

        def work():
            picked = session.pick_sample(strategy)
            return None if picked is None else session.download_sample(str(picked["id"]), picked)

        def apply(files):
            if files is None:
                return None
            if self.hasSample() and not self._segmentMissing() and _digest(self.mask()) != digestBefore:
                raise UnsavedEditsError(
                    "the label of {} was edited while the next sample downloaded; it stays loaded, "
                    "submit it or ask for the next sample again".format(self.imageId)
                )
            self.loadSampleFiles(files)
            return files

        return Job("Next sample", work, apply)

    def _segmentMissing(self):
        try:
            self.segmentId()
            return False
        except SegmentMissingError:
            return True

    def loadSampleFiles(self, files):
        """Read the image and its original label with Slicer's readers and make the tumour segment."""
        self.closeSample()
        volumesLogic = slicer.modules.volumes.logic()
        with tempfile.TemporaryDirectory(prefix="lungnlb-") as folder:
            name = os.path.basename(files.image_filename.replace("\\", "/")) or "image.nii.gz"
            if not name.lower().endswith((".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")):
                name += ".nii.gz"
            imagePath = os.path.join(folder, name)
            with open(imagePath, "wb") as handle:
                handle.write(files.image_data)
            volumeNode = volumesLogic.AddArchetypeVolume(imagePath, files.image_id, 0)
            if volumeNode is None:
                raise ValueError("Slicer cannot read the image file {} the server sent".format(name))
            labelNode = None
            if files.label_data:
                labelPath = os.path.join(folder, "original-label.nii.gz")
                with open(labelPath, "wb") as handle:
                    handle.write(files.label_data)
                labelNode = volumesLogic.AddArchetypeVolume(labelPath, files.image_id + " original", 1)
                if labelNode is None:
                    _removeNode(volumeNode)
                    raise ValueError("Slicer cannot read the original label of {} the server sent".format(files.image_id))
        for node in (volumeNode, labelNode):
            if node is not None and node.GetStorageNode() is not None:
                _removeNode(node.GetStorageNode())  # the temporary file is gone; Save asks for a place
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", files.image_id + " label")
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segmentationNode.CreateDefaultDisplayNodes()
        segmentId = segmentationNode.GetSegmentation().AddEmptySegment(SEGMENT_ID, SEGMENT_NAME, [0.9, 0.2, 0.2])
        parameterNode = self.getParameterNode()
        parameterNode.SetNodeReferenceID("Volume", volumeNode.GetID())
        parameterNode.SetNodeReferenceID("Segmentation", segmentationNode.GetID())
        parameterNode.SetParameter("SegmentID", segmentId)
        parameterNode.SetParameter("ImageID", files.image_id)
        self.imageId = files.image_id
        self.info = dict(files.info)
        if labelNode is not None:
            labels = slicer.util.arrayFromVolume(labelNode)
            labels[:] = labels > 0  # any label value is the tumour
            slicer.util.arrayFromVolumeModified(labelNode)
            segmentIds = vtk.vtkStringArray()
            segmentIds.InsertNextValue(segmentId)
            imported = slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelNode, segmentationNode, segmentIds)
            _removeNode(labelNode)
            if not imported:
                raise ValueError("cannot import the original label of {} into the segmentation".format(files.image_id))
        self.savedDigest = _digest(self.mask())
        self.rotateSliceViewsToVolume()
        self.jumpToSlice(self.shape()[0] // 2)
        return volumeNode

    # -- server actions -----------------------------------------------------------------------------------

    def segmentCurrentSliceJob(self):
        session = self.requireSession()
        z = self.requireSlice()
        self.segmentId()  # the result goes into it: fail now, not after the server worked
        piece = extract_slice(self.requestSample().image, z)  # a copy of one slice: the worker reads no node
        oneSlice = Sample(self.imageId, Volume(piece.array[np.newaxis], piece.affine), None, self.info)

        def apply(result):
            self.setSliceMask(z, result.mask)
            rows = [row._replace(z=z, mask_pixels=int(result.mask.sum())) for row in result.rows]
            self.rows = merge_rows(self.rows, rows)
            self.modelVersion = str(result.params.get("model_version", self.modelVersion))
            return result

        return Job("Segment current slice", lambda: session.segment_slice(oneSlice, 0), apply)

    def segmentVolumeJob(self):
        session = self.requireSession()
        sample = self.requestSample()
        self.segmentId()

        def apply(result):
            self.setMask(result.mask)
            self.rows = result.rows
            self.reviewedSlices.update(row.z for row in result.rows)
            self.modelVersion = str(result.params.get("model_version", self.modelVersion))
            return result

        timeout = session.client.infer_timeout
        return Job("Segment volume (the server may take up to {:g} s)".format(timeout), lambda: session.segment_volume(sample), apply)

    def watershedFromRoiJob(self, roiNode):
        session = self.requireSession()
        if roiNode is None:
            raise ValueError("select a box (ROI) under Watershed > Box, then place it over the nodule")
        if roiNode.GetNumberOfDefinedControlPoints() == 0:
            raise ValueError(
                "the box '{}' has not been placed yet: click the place button next to it and draw the box "
                "around the nodule on the slice shown".format(roiNode.GetName())
            )
        z = self.requireSlice()
        self.segmentId()
        objectToWorld = slicer.util.arrayFromVTKMatrix(roiNode.GetObjectToWorldMatrix())
        size = [0.0, 0.0, 0.0]
        roiNode.GetSizeWorld(size)
        box = roi_to_pixel_box(self.ijkToRas(), self.shape(), objectToWorld, size, z)
        sample = self.requestSample()
        return Job("Watershed from box", lambda: session.watershed_box(sample, box, z), lambda mask: self._applySlice(z, mask))

    def watershedFromPointsJob(self, foregroundNode, backgroundNode=None):
        session = self.requireSession()
        foreground = _definedPositions(foregroundNode)
        if not foreground:
            raise ValueError("place at least one point inside the nodule (Watershed > Points)")
        self.segmentId()
        affine, shape = self.ijkToRas(), self.shape()
        pixels, z = points_to_pixels(affine, shape, foreground)
        background = _definedPositions(backgroundNode)
        backgroundPixels = []
        if background:
            backgroundPixels, backgroundZ = points_to_pixels(affine, shape, background)
            if backgroundZ != z:
                raise ValueError(
                    "the background points are on slice {}, the nodule's points on slice {}: place them on one slice".format(backgroundZ, z)
                )
        sample = self.requestSample()
        return Job(
            "Watershed from points",
            lambda: session.watershed_points(sample, pixels, backgroundPixels, z),
            lambda mask: self._applySlice(z, mask),
        )

    def _applySlice(self, z, sliceMask):
        self.setSliceMask(z, sliceMask)
        return sliceMask

    def attentionJob(self):
        session = self.requireSession()
        z = self.requireSlice()
        piece = extract_slice(self.requestSample().image, z)
        oneSlice = Sample(self.imageId, Volume(piece.array[np.newaxis], piece.affine), None, self.info)

        def apply(sliceHeat):
            heat = np.zeros(self.shape(), dtype=np.float32)
            heat[z] = sliceHeat
            attentionNode = self.attentionNode()
            if attentionNode is None:
                attentionNode = slicer.util.addVolumeFromArray(heat, ijkToRAS=self.ijkToRas(), name=self.imageId + " attention")
                attentionNode.CreateDefaultDisplayNodes()
                attentionNode.GetDisplayNode().SetAndObserveColorNodeID("vtkMRMLColorTableNodeRainbow")
                self.getParameterNode().SetNodeReferenceID("Attention", attentionNode.GetID())
            else:
                slicer.util.updateVolumeFromArray(attentionNode, heat)
            slicer.util.setSliceViewerLayers(foreground=attentionNode, foregroundOpacity=0.4)
            return heat

        return Job("Attention map", lambda: session.attention_slice(oneSlice, 0), apply)

    def hideAttention(self):
        if self.attentionNode() is not None:
            slicer.util.setSliceViewerLayers(foreground=None)

    def submitJob(self):
        """Submit the tumour segment as the final label. A failed upload keeps it locally (counts as saved)."""
        session = self.requireSession()
        mask = self.mask()
        labelled = sorted(self.reviewedSlices | set(np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1)).tolist()))
        sample = self.requestSample()
        digest = _digest(mask)

        def work():
            try:
                return session.submit(sample, mask, labelled_slices=labelled or None)
            except SubmissionPending as pending:
                return pending

        def apply(outcome):
            self.savedDigest = digest  # on the server, or safe on disk until Send pending
            if isinstance(outcome, SubmissionPending):
                raise outcome
            return outcome

        return Job("Submit label", work, apply)

    def startTrainingJob(self, epochs):
        session = self.requireSession()
        return Job("Train", lambda: session.start_training({"max_epochs": int(epochs)}), lambda status: status)

    def stopTrainingJob(self):
        session = self.requireSession()
        return Job("Stop training", session.stop_training, lambda status: status)


def _digest(mask):
    mask = np.asarray(mask, dtype=bool)
    return hashlib.sha1(np.packbits(mask).tobytes() + str(mask.shape).encode()).hexdigest()


def _definedPositions(markupsNode):
    if markupsNode is None:
        return []
    positions = []
    for index in range(markupsNode.GetNumberOfControlPoints()):
        if markupsNode.GetNthControlPointPositionStatus(index) != markupsNode.PositionDefined:
            continue  # a point still being placed
        position = [0.0, 0.0, 0.0]
        markupsNode.GetNthControlPointPositionWorld(index, position)
        positions.append(position)
    return positions


def _removeNode(node):
    """Remove a node with its display and storage nodes (which the scene would otherwise keep)."""
    if node is None or slicer.mrmlScene.GetNodeByID(node.GetID()) is None:
        return
    if hasattr(node, "GetNumberOfDisplayNodes"):
        for index in reversed(range(node.GetNumberOfDisplayNodes())):
            display = node.GetNthDisplayNode(index)
            if display is not None:
                slicer.mrmlScene.RemoveNode(display)
    if hasattr(node, "GetStorageNode") and node.GetStorageNode() is not None:
        slicer.mrmlScene.RemoveNode(node.GetStorageNode())
    slicer.mrmlScene.RemoveNode(node)


#
# Test (runs inside Slicer against the in-process fake server of LungNLBLib.testing; no live server needed)
#


class LungNLBTest(ScriptedLoadableModuleTest):
    """The annotation loop on the module's logic, on Slicer's own scene and readers, against LungNLBLib.testing.FakeServer."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_annotation_loop()

    def test_annotation_loop(self):
        from LungNLBLib.testing import FakeImage, FakeServer

        affine = np.array([[0.7, 0.0, 0.0, -100.0], [0.0, 0.7, 0.0, -80.0], [0.0, 0.0, 2.5, 40.0], [0.0, 0.0, 0.0, 1.0]])
        image = np.full((6, 40, 32), -800, dtype=np.int16)
        image[3, 10:20, 8:16] = 300  # the "tumour" the fake model finds
        original = np.zeros(image.shape, np.uint8)
        original[3, 12:18, 10:14] = 1
        with FakeServer({"case-1": FakeImage(image, affine, original)}) as server:
            logic = LungNLBLogic()
            logic.pendingFolder = lambda: os.path.join(slicer.app.temporaryPath, "LungNLBTest-pending")
            logic.connectSession(server.url, "slicer-self-test", timeout=30.0)
            files = logic.run(logic.nextSampleJob())
            self.assertEqual(files.image_id, "case-1")
            self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(logic.volumeNode()), image))
            self.assertTrue(np.array_equal(logic.mask(), original > 0))
            logic.jumpToSlice(3)
            self.assertEqual(logic.currentSliceIndex(), 3)
            logic.run(logic.segmentCurrentSliceJob())
            self.assertEqual(int(logic.mask()[3].sum()), 80)
            confirmation = logic.run(logic.submitJob())
            self.assertEqual(confirmation.get("image"), "case-1")
            self.assertTrue(np.array_equal(server.labels[("case-1", "final")]["array"] > 0, logic.mask()))
        self.delayDisplay("LungNLB annotation loop passed")
