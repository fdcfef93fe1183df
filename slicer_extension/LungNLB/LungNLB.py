"""LungNLB: annotate lung tumours in 3D Slicer with a MONAI Label server running the LungNLB app.

This file is the Slicer side only (widgets, MRML nodes); the workflow, the HTTP client and the file
formats live in LungNLBLib (pure Python, tested outside Slicer).
"""

import contextlib
import os
import time

import numpy as np
import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from LungNLBLib.client import MonaiLabelClient
from LungNLBLib.errors import ClientError
from LungNLBLib.geometry import as_volume, points_to_pixels, ras_box_to_pixel_box
from LungNLBLib.probability import merge_rows, probability_at
from LungNLBLib.session import DEFAULT_STRATEGY, AnnotationSession, describe_training, training_active

SETTINGS_PREFIX = "LungNLB/"
DEFAULT_SERVER_URL = "http://127.0.0.1:8000"
SEGMENT_NAME = "tumour"
TRAIN_POLL_MS = 2000


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


#
# Widget
#


class LungNLBWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.trainTimer = None
        self.observedSliceNode = None

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
        self.ui.roiSelector.setMRMLScene(slicer.mrmlScene)
        self.ui.pointsSelector.setMRMLScene(slicer.mrmlScene)
        self.ui.probabilityTable.setColumnCount(3)
        self.ui.probabilityTable.setHorizontalHeaderLabels(["Slice", "p(tumour)", "Mask pixels"])

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
        self.ui.trainButton.connect("clicked(bool)", self.onTrain)
        self.ui.probabilityTable.connect("cellDoubleClicked(int,int)", self.onTableRowDoubleClicked)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.observeSliceNode()
        self.updatePendingLabel()
        self.updateButtons()

    def cleanup(self):
        self.removeObservers()
        if self.trainTimer is not None:
            self.trainTimer.stop()

    def onSceneEndClose(self, caller, event):
        if self.logic is not None:
            self.logic.forgetSample()
        self.updateTable()
        self.updateButtons()

    # -- helpers ----------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def busy(self, what):
        """Wait cursor while talking to the server; any error is shown to the annotator in words."""
        self.ui.statusLabel.text = what + "..."
        slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
        slicer.app.processEvents()
        try:
            yield
            self.ui.statusLabel.text = what + ": done"
        except (ClientError, ValueError, FileNotFoundError) as error:
            self.ui.statusLabel.text = what + ": failed"
            slicer.util.errorDisplay("{} failed.\n\n{}".format(what, error))
        finally:
            slicer.app.restoreOverrideCursor()
            self.updatePendingLabel()
            self.updateButtons()

    def session(self):
        settings = qt.QSettings()
        url = self.ui.serverUrlLineEdit.text.strip()
        annotator = self.ui.annotatorLineEdit.text.strip()
        settings.setValue(SETTINGS_PREFIX + "serverUrl", url)
        settings.setValue(SETTINGS_PREFIX + "annotator", annotator)
        return self.logic.connectSession(url, annotator, timeout=float(self.ui.timeoutSpinBox.value))

    def updateButtons(self):
        hasSample = self.logic is not None and self.logic.sample is not None
        for button in (
            self.ui.segmentSliceButton,
            self.ui.segmentVolumeButton,
            self.ui.watershedBoxButton,
            self.ui.watershedPointsButton,
            self.ui.editButton,
            self.ui.submitButton,
        ):
            button.enabled = hasSample
        self.ui.attentionCheckBox.enabled = hasSample

    def updatePendingLabel(self):
        count = self.logic.pendingCount() if self.logic is not None else 0
        self.ui.pendingLabel.text = "{} label(s) saved locally, not yet confirmed by the server".format(count)
        self.ui.sendPendingButton.enabled = count > 0

    def updateTable(self):
        rows = self.logic.rows if self.logic is not None else []
        table = self.ui.probabilityTable
        table.setRowCount(len(rows))
        for index, row in enumerate(rows):
            for column, text in enumerate((str(row.z), "{:.3f}".format(row.probability), str(max(row.mask_pixels, 0)))):
                item = qt.QTableWidgetItem(text)
                item.setFlags(qt.Qt.ItemIsSelectable | qt.Qt.ItemIsEnabled)
                table.setItem(index, column, item)
        self.onSliceChanged()

    def observeSliceNode(self):
        sliceNode = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode() if slicer.app.layoutManager() else None
        if sliceNode is not None:
            self.addObserver(sliceNode, vtk.vtkCommand.ModifiedEvent, self.onSliceChanged)

    def onSliceChanged(self, caller=None, event=None):
        """Show the current slice's tumour probability in the panel and in the Red view's corner."""
        if self.logic is None or self.logic.sample is None:
            self.ui.currentSliceLabel.text = ""
            return
        z = self.logic.currentSliceIndex()
        probability = probability_at(self.logic.rows, z) if z is not None else None
        text = "slice {}: p(tumour) = {}".format(z, "{:.3f}".format(probability) if probability is not None else "not segmented")
        self.ui.currentSliceLabel.text = text
        self.logic.showInSliceView(text)

    # -- actions ----------------------------------------------------------------------------------------------

    def onConnect(self):
        with self.busy("Connect"):
            summary = self.session().connect()
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

    def onNextSample(self):
        with self.busy("Next sample"):
            strategy = self.ui.strategyComboBox.currentText or DEFAULT_STRATEGY
            if self.logic.nextSample(self.session(), strategy) is None:
                slicer.util.infoDisplay("The '{}' strategy has no image left to label.".format(strategy))
                return
            self.ui.sampleLabel.text = self.logic.sample.image_id
            self.updateTable()

    def onSegmentSlice(self):
        with self.busy("Segment current slice"):
            self.logic.segmentCurrentSlice()
            self.updateTable()

    def onSegmentVolume(self):
        with self.busy("Segment volume"):
            self.logic.segmentVolume()
            self.updateTable()

    def onWatershedBox(self):
        with self.busy("Watershed from box"):
            roiNode = self.ui.roiSelector.currentNode()
            if roiNode is None:
                raise ValueError("select or draw a box (ROI markup) over the nodule first")
            self.logic.watershedFromRoi(roiNode)

    def onWatershedPoints(self):
        with self.busy("Watershed from points"):
            pointsNode = self.ui.pointsSelector.currentNode()
            if pointsNode is None or pointsNode.GetNumberOfControlPoints() == 0:
                raise ValueError("place points inside the nodule first (point list markup)")
            self.logic.watershedFromPoints(pointsNode)

    def onAttentionToggled(self, checked):
        with self.busy("Attention map"):
            self.logic.showAttention(bool(checked))

    def onEdit(self):
        self.logic.openSegmentEditor()

    def onSubmit(self):
        with self.busy("Submit label"):
            confirmation = self.logic.submit()
            self.ui.statusLabel.text = "Label of {} saved on the server ({})".format(
                confirmation.get("image", ""), confirmation.get("label", "final")
            )

    def onSendPending(self):
        with self.busy("Send pending labels"):
            done, errors = self.logic.sendPending(self.session())
            if errors:
                raise ValueError("{} sent, {} still pending:\n{}".format(len(done), len(errors), "\n".join(errors)))

    def onTrain(self):
        with self.busy("Train"):
            self.logic.startTraining(self.session(), int(self.ui.epochsSpinBox.value))
            if self.trainTimer is None:
                self.trainTimer = qt.QTimer()
                self.trainTimer.setInterval(TRAIN_POLL_MS)
                self.trainTimer.connect("timeout()", self.onTrainPoll)
            self.trainTimer.start()

    def onTrainPoll(self):
        try:
            status = self.logic.session.training_status()
        except ClientError as error:
            self.ui.trainStatusLabel.text = "cannot read training progress: {}".format(error)
            return
        self.ui.trainStatusLabel.text = describe_training(status)
        if not training_active(status):
            self.trainTimer.stop()

    def onTableRowDoubleClicked(self, row, column):
        z = int(self.ui.probabilityTable.item(row, 0).text())
        self.logic.jumpToSlice(z)


#
# Logic: Slicer nodes <-> LungNLBLib arrays
#


class LungNLBLogic(ScriptedLoadableModuleLogic):
    """Holds the current sample's nodes and converts them to and from the library's (Z, Y, X) arrays."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.session = None
        self.sample = None
        self.volumeNode = None
        self.segmentationNode = None
        self.attentionNode = None
        self.rows = []
        self.reviewedSlices = set()

    @staticmethod
    def pendingFolder():
        settingsDir = os.path.dirname(slicer.app.slicerUserSettingsFilePath)
        return os.path.join(settingsDir, "LungNLB", "pending")

    def connectSession(self, url, annotator, timeout=30.0):
        client = MonaiLabelClient(url, timeout=timeout)
        self.session = AnnotationSession(client, annotator, self.pendingFolder())
        return self.session

    def pendingCount(self):
        folder = self.pendingFolder()
        return len([name for name in os.listdir(folder) if name.endswith(".json")]) if os.path.isdir(folder) else 0

    def forgetSample(self):
        self.sample = None
        self.volumeNode = self.segmentationNode = self.attentionNode = None
        self.rows = []
        self.reviewedSlices = set()

    # -- loading ----------------------------------------------------------------------------------------------

    def nextSample(self, session, strategy=DEFAULT_STRATEGY):
        sample = session.next_sample(strategy)
        if sample is None:
            return None
        self.forgetSample()
        self.sample = sample
        self.volumeNode = slicer.util.addVolumeFromArray(
            as_volume(sample.image.array), ijkToRAS=sample.image.affine, name=sample.image_id
        )
        self.segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", sample.image_id + " label")
        self.segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(self.volumeNode)
        self.segmentationNode.CreateDefaultDisplayNodes()
        self.segmentationNode.GetSegmentation().AddEmptySegment(SEGMENT_NAME, SEGMENT_NAME, [0.9, 0.2, 0.2])
        if sample.original_label is not None:
            self.setMask(as_volume(sample.original_label.array) > 0)
        slicer.util.setSliceViewerLayers(background=self.volumeNode, fit=True)
        self.openSegmentEditor(select=False)
        return sample

    def segmentId(self):
        return self.segmentationNode.GetSegmentation().GetSegmentIdBySegmentName(SEGMENT_NAME)

    def mask(self):
        """The tumour segment as a bool (Z, Y, X) array on the image grid."""
        array = slicer.util.arrayFromSegmentBinaryLabelmap(self.segmentationNode, self.segmentId(), self.volumeNode)
        return np.asarray(array) > 0

    def setMask(self, mask):
        slicer.util.updateSegmentBinaryLabelmapFromArray(
            np.asarray(mask, dtype=np.uint8), self.segmentationNode, self.segmentId(), self.volumeNode
        )

    def setSliceMask(self, z, sliceMask):
        mask = self.mask()
        mask[z] = sliceMask
        self.setMask(mask)
        self.reviewedSlices.add(int(z))

    def currentSliceIndex(self, viewName="Red"):
        """The k index of the volume slice shown in a slice view (None when it is off the volume)."""
        if self.volumeNode is None:
            return None
        sliceNode = slicer.app.layoutManager().sliceWidget(viewName).mrmlSliceNode()
        sliceToRas = sliceNode.GetSliceToRAS()
        center = [sliceToRas.GetElement(row, 3) for row in range(3)]
        rasToIjk = vtk.vtkMatrix4x4()
        self.volumeNode.GetRASToIJKMatrix(rasToIjk)
        k = int(round(rasToIjk.MultiplyPoint(center + [1.0])[2]))
        depth = as_volume(self.sample.image.array).shape[0]
        return k if 0 <= k < depth else None

    def jumpToSlice(self, z, viewName="Red"):
        ijkToRas = vtk.vtkMatrix4x4()
        self.volumeNode.GetIJKToRASMatrix(ijkToRas)
        depth, height, width = as_volume(self.sample.image.array).shape
        ras = ijkToRas.MultiplyPoint([(width - 1) / 2.0, (height - 1) / 2.0, float(z), 1.0])[:3]
        slicer.modules.markups.logic().JumpSlicesToLocation(ras[0], ras[1], ras[2], True)

    def showInSliceView(self, text, viewName="Red"):
        view = slicer.app.layoutManager().sliceWidget(viewName).sliceView()
        view.cornerAnnotation().SetText(vtk.vtkCornerAnnotation.UpperRight, text)
        view.forceRender()

    # -- server actions -----------------------------------------------------------------------------------------

    def requireSlice(self):
        z = self.currentSliceIndex()
        if z is None:
            raise ValueError("the Red slice view is not on a slice of the sample; scroll onto the image first")
        return z

    def segmentCurrentSlice(self):
        z = self.requireSlice()
        result = self.session.segment_slice(self.sample, z)
        self.setSliceMask(z, result.mask)
        self.rows = merge_rows(self.rows, [row._replace(mask_pixels=int(result.mask.sum())) for row in result.rows])
        return result

    def segmentVolume(self):
        result = self.session.segment_volume(self.sample)
        self.setMask(as_volume(result.mask))
        self.rows = result.rows
        self.reviewedSlices.update(row.z for row in result.rows)
        return result

    def watershedFromRoi(self, roiNode):
        z = self.requireSlice()
        bounds = [0.0] * 6
        roiNode.GetRASBounds(bounds)
        box = ras_box_to_pixel_box(
            self.sample.image.affine, self.sample.image.array.shape, bounds[0::2], bounds[1::2], z
        )
        sliceMask = self.session.watershed_box(self.sample, box, z)
        self.setSliceMask(z, sliceMask)
        return sliceMask

    def watershedFromPoints(self, pointsNode):
        positions = []
        for index in range(pointsNode.GetNumberOfControlPoints()):
            position = [0.0, 0.0, 0.0]
            pointsNode.GetNthControlPointPositionWorld(index, position)
            positions.append(position)
        pixels, z = points_to_pixels(self.sample.image.affine, self.sample.image.array.shape, positions)
        sliceMask = self.session.watershed_points(self.sample, pixels, [], z)
        self.setSliceMask(z, sliceMask)
        return sliceMask

    def showAttention(self, show):
        if not show:
            if self.attentionNode is not None:
                slicer.util.setSliceViewerLayers(foreground=None)
            return None
        z = self.requireSlice()
        heat = np.zeros(as_volume(self.sample.image.array).shape, dtype=np.float32)
        heat[z] = self.session.attention_slice(self.sample, z)
        if self.attentionNode is None:
            self.attentionNode = slicer.util.addVolumeFromArray(
                heat, ijkToRAS=self.sample.image.affine, name=self.sample.image_id + " attention"
            )
            self.attentionNode.GetDisplayNode().SetAndObserveColorNodeID("vtkMRMLColorTableNodeRainbow")
        else:
            slicer.util.updateVolumeFromArray(self.attentionNode, heat)
        slicer.util.setSliceViewerLayers(foreground=self.attentionNode, foregroundOpacity=0.4)
        return heat

    def openSegmentEditor(self, select=True):
        if select:
            slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(self.segmentationNode)
        if hasattr(editor, "setSourceVolumeNode"):
            editor.setSourceVolumeNode(self.volumeNode)
        else:  # Slicer < 5.4
            editor.setMasterVolumeNode(self.volumeNode)

    def submit(self):
        """Submit the tumour segment as the final label; it stays in the scene whatever happens."""
        mask = self.mask()
        labelled = sorted(self.reviewedSlices | set(np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1)).tolist()))
        return self.session.submit(self.sample, mask, labelled_slices=labelled or None)

    def sendPending(self, session):
        self.session = session
        return session.submit_pending()

    def startTraining(self, session, epochs):
        self.session = session
        return session.start_training({"max_epochs": int(epochs)})


#
# Test (runs inside Slicer against a running server; see docs/slicer.md)
#


class LungNLBTest(ScriptedLoadableModuleTest):
    """The annotation loop on the module itself. Server URL: env LUNGNLB_SERVER_URL (default 127.0.0.1:8000)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_annotation_loop()

    def test_annotation_loop(self):
        url = os.environ.get("LUNGNLB_SERVER_URL", DEFAULT_SERVER_URL)
        logic = LungNLBLogic()
        session = logic.connectSession(url, "slicer-self-test", timeout=60.0)
        summary = session.connect()
        self.delayDisplay("Connected to {}: models {}".format(url, summary.models))
        self.assertIn("lung_watershed", summary.models)
        self.assertIn(
            "lung_nlb_seg", summary.models, "start the server with weights (--conf checkpoint <weights.pt>) for this test"
        )
        self.assertIn(DEFAULT_STRATEGY, summary.strategies)

        sample = logic.nextSample(session, DEFAULT_STRATEGY)
        self.assertIsNotNone(sample, "the server's datastore has no image to label")
        self.assertEqual(slicer.util.arrayFromVolume(logic.volumeNode).shape, as_volume(sample.image.array).shape)

        depth, height, width = as_volume(sample.image.array).shape
        z = depth // 2
        logic.jumpToSlice(z)
        self.assertEqual(logic.currentSliceIndex(), z)

        sliceResult = logic.segmentCurrentSlice()
        self.assertEqual(sliceResult.mask.shape, (height, width))
        self.assertIsNotNone(probability_at(logic.rows, z))
        volumeResult = logic.segmentVolume()
        self.assertEqual(len(volumeResult.rows), depth)
        versionBefore = volumeResult.params["model_version"]

        # a box over the middle quarter of slice z, drawn as an ROI markup in RAS
        roiNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
        affine = sample.image.affine
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        center = affine @ np.array([(width - 1) / 2.0, (height - 1) / 2.0, z, 1.0])
        roiNode.SetCenter(center[:3].tolist())
        roiNode.SetSize([spacing[0] * width / 4.0, spacing[1] * height / 4.0, spacing[2] / 2.0])
        sliceMask = logic.watershedFromRoi(roiNode)
        self.assertEqual(sliceMask.shape, (height, width))
        self.assertTrue(np.array_equal(logic.mask()[z], sliceMask))

        edited = logic.mask()
        edited[z, : height // 8, : width // 8] = True  # the annotator's own stroke
        logic.setMask(edited)
        confirmation = logic.submit()
        self.assertEqual(confirmation.get("image"), sample.image_id)
        self.assertEqual(logic.pendingCount(), 0)

        logic.startTraining(session, 1)
        deadline = time.time() + 900
        status = session.training_status()
        while training_active(status) and time.time() < deadline:
            slicer.app.processEvents()
            time.sleep(2)
            status = session.training_status()
        self.assertEqual(str(status.get("status", "")).upper(), "DONE", describe_training(status))

        after = logic.segmentVolume()
        self.assertNotEqual(after.params["model_version"], versionBefore, "training published no new weights")
        self.delayDisplay("LungNLB annotation loop passed")
