"""The Slicer module's widget class (LungNLBWidget) driven through stand-ins for Qt, on Slicer's real MRML
(`slicer-core`) and the module's real logic, against LungNLBLib.testing.FakeServer.

Qt is not installable here, so every widget of the panel is a small stand-in object with the properties and
slots the module uses (text, enabled, visible, connect ...), one per widget name in the real
Resources/UI/LungNLB.ui (a name the module uses that the .ui file lacks fails here). Timers do not tick by
themselves: the tests call the timer's slot, as Qt's event loop would. What this checks: which buttons are
enabled when, what the labels, the table, the Red view's corner and the dialogs say, the settings kept (never
the password), that every action runs through a worker thread with a progress bar and Cancel, and that
errors become dialogs. Not checked: layout, rendering, the real Qt widgets' behaviour.
"""

import time
import types
from pathlib import Path

import numpy as np
import pytest

import slicer
import slicer.util

from Testing import headless

UI_FILE = Path(__file__).resolve().parents[1] / "slicer_extension" / "LungNLB" / "Resources" / "UI" / "LungNLB.ui"


class _Widget:
    """One Qt widget of the panel: the properties the module reads and writes, and its connected slots."""

    def __init__(self, name):
        self.name = name
        self.text = ""
        self.enabled = True
        self.visible = False
        self.value = 0
        self.checked = False
        self.currentPath = ""
        self.currentText = ""
        self.items = []
        self.slots = {}
        self.cells = {}
        self.rowCount = 0
        self._node = None

    def connect(self, signal, slot):
        self.slots[signal] = slot

    def click(self):
        assert self.enabled, self.name + " is disabled"
        self.slots["clicked(bool)"]()

    def setMRMLScene(self, scene):
        pass

    def setCurrentNode(self, node):
        self._node = node

    def currentNode(self):
        return self._node

    def setRange(self, low, high):
        self.range = (low, high)

    def clear(self):
        self.items, self.currentText = [], ""

    def addItem(self, text):
        self.items.append(text)
        self.currentText = self.currentText or text

    def setColumnCount(self, count):
        self.columns = count

    def setHorizontalHeaderLabels(self, labels):
        self.headers = list(labels)

    def setRowCount(self, count):
        self.rowCount = count
        self.cells = {key: item for key, item in self.cells.items() if key[0] < count}

    def setItem(self, row, column, item):
        self.cells[(row, column)] = item

    def item(self, row, column):
        return self.cells.get((row, column))


def _ui_widgets():
    """A stand-in for every widget of the .ui file, with the `value` / `text` / `checked` the file gives it."""
    import xml.etree.ElementTree as ET

    widgets = {}
    for element in ET.parse(UI_FILE).iter("widget"):
        widget = _Widget(element.get("name"))
        for prop in element.findall("property"):
            value = next(iter(prop), None)
            if prop.get("name") == "value" and value is not None:
                widget.value = float(value.text) if value.tag == "double" else int(value.text)
            elif prop.get("name") == "checked" and value is not None:
                widget.checked = value.text == "true"
            elif prop.get("name") == "text" and value is not None and value.tag == "string":
                widget.text = value.text or ""
        widgets[widget.name] = widget
    return widgets


class _Timer:
    def __init__(self):
        self.active, self.slots = False, {}

    def setInterval(self, ms):
        self.interval = ms

    def connect(self, signal, slot):
        self.slots[signal] = slot

    def start(self):
        self.active = True

    def stop(self):
        self.active = False


class _Item:
    def __init__(self, text):
        self._text = text

    def text(self):
        return self._text

    def setFlags(self, flags):
        self.flags = flags


def _qt():
    qt = types.ModuleType("qt")
    store = {}
    qt.settings = store
    qt.QSettings = lambda: types.SimpleNamespace(value=lambda key, default="": store.get(key, default),
                                                 setValue=store.__setitem__)
    qt.QTimer = _Timer
    qt.QTableWidgetItem = _Item
    qt.Qt = types.SimpleNamespace(ItemIsSelectable=1, ItemIsEnabled=32)

    class QMessageBox:
        Save, Discard, Cancel, Warning = 0x800, 0x800000, 0x400000, 2
        answers = []  # what the annotator clicks, in order
        shown = []

        def __init__(self, parent=None):
            self.texts = {}

        def setWindowTitle(self, text):
            self.texts["title"] = text

        def setIcon(self, icon):
            pass

        def setText(self, text):
            self.texts["text"] = text

        def setInformativeText(self, text):
            self.texts["informative"] = text

        def setStandardButtons(self, buttons):
            pass

        def setDefaultButton(self, button):
            pass

        def exec_(self):
            QMessageBox.shown.append(self.texts)
            return QMessageBox.answers.pop(0)

    qt.QMessageBox = QMessageBox
    qt.QInputDialog = types.SimpleNamespace(choice=None, getItem=lambda parent, title, label, names, current, editable:
                                            qt.QInputDialog.choice(names))
    return qt


@pytest.fixture()
def panel(tmp_path, monkeypatch):
    import sys

    qt = _qt()
    scene, red = headless.install(tmp_path / "settings" / "Slicer.ini", qt_module=qt)
    sys.modules.pop("LungNLB", None)
    import LungNLB

    shown = {"errors": [], "infos": [], "layers": [], "modules": [], "confirm": True}
    ui = types.SimpleNamespace(**_ui_widgets())
    editor = types.SimpleNamespace(nodes={})
    editor.setSegmentationNode = lambda node: editor.nodes.__setitem__("segmentation", node)
    editor.setSourceVolumeNode = lambda node: editor.nodes.__setitem__("source", node)
    monkeypatch.setattr(slicer.util, "loadUI", lambda path: types.SimpleNamespace(path=path, setMRMLScene=lambda s: None),
                        raising=False)
    monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda widget: ui, raising=False)
    monkeypatch.setattr(slicer.util, "mainWindow", lambda: None, raising=False)
    monkeypatch.setattr(slicer.util, "errorDisplay",
                        lambda text, detailedText="", **kw: shown["errors"].append((text, detailedText)), raising=False)
    monkeypatch.setattr(slicer.util, "infoDisplay", lambda text, **kw: shown["infos"].append(text), raising=False)
    monkeypatch.setattr(slicer.util, "confirmYesNoDisplay", lambda text, **kw: shown["confirm"], raising=False)
    monkeypatch.setattr(slicer.util, "setSliceViewerLayers", lambda **kw: shown["layers"].append(kw), raising=False)
    monkeypatch.setattr(slicer.util, "selectModule", lambda name: shown["modules"].append(name), raising=False)
    slicer.modules.segmenteditor = types.SimpleNamespace(
        widgetRepresentation=lambda: types.SimpleNamespace(self=lambda: types.SimpleNamespace(editor=editor)))
    qt.settings["LungNLB/annotator"] = "dr-who"
    widget = LungNLB.LungNLBWidget()
    widget.setup()
    assert UI_FILE.samefile(widget.resourcePath("UI/LungNLB.ui"))
    yield types.SimpleNamespace(widget=widget, ui=ui, qt=qt, shown=shown, editor=editor, module=LungNLB, red=red)
    widget.cleanup()
    sys.modules.pop("LungNLB", None)


def _finish(widget, seconds=20.0):
    """Tick the request timer (as Qt's event loop does) until the running request has been applied."""
    deadline = time.monotonic() + seconds
    while widget.task is not None:
        assert time.monotonic() < deadline, "the request did not finish"
        widget.taskTimer.slots["timeout()"]()
        time.sleep(0.01)


def _poll_training(widget, seconds=20.0):
    """Tick the training timer until one status poll has come back and been shown."""
    deadline = time.monotonic() + seconds
    widget.trainTimer.slots["timeout()"]()  # starts a poll (or shows one that is back)
    while widget.trainPoll is not None:
        assert time.monotonic() < deadline, "the training poll did not come back"
        time.sleep(0.02)
        widget.trainTimer.slots["timeout()"]()


def _images():
    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    first = np.full((6, 40, 32), -800, dtype=np.int16)
    first[3, 10:20, 8:16] = 300  # what the fake model calls tumour
    original = np.zeros(first.shape, np.uint8)
    original[3, 12:18, 10:14] = 1
    from LungNLBLib.testing import FakeImage

    return {"case-1": FakeImage(first, affine, original), "case-2": FakeImage(np.zeros((4, 24, 20), np.int16), affine)}


def _connect(panel, url):
    panel.ui.serverUrlLineEdit.text = url
    panel.ui.passwordLineEdit.text = "not-kept"
    panel.ui.connectButton.click()
    assert panel.widget.task is not None, panel.shown["errors"]
    assert panel.ui.cancelRequestButton.visible  # runs on a worker thread
    assert not panel.ui.nextSampleButton.enabled and not panel.ui.connectButton.enabled
    _finish(panel.widget)
    assert panel.ui.statusLabel.text == "Connect: done" and not panel.ui.requestProgressBar.visible


def test_panel_connects_loads_segments_and_shows_the_probability(panel):
    from LungNLBLib.testing import FakeServer

    ui = panel.ui
    assert ui.annotatorLineEdit.text == "dr-who"  # restored from the settings
    assert not ui.segmentSliceButton.enabled and not ui.submitButton.enabled and ui.connectButton.enabled
    with FakeServer(_images(), model_version="v3") as server:
        _connect(panel, server.url)
        assert ui.strategyComboBox.items == ["disagreement", "random"] and ui.strategyComboBox.currentText == "disagreement"
        assert "LungNLB (fake)" in ui.serverInfoLabel.text and "lung_nlb_seg" in ui.serverInfoLabel.text
        assert panel.qt.settings["LungNLB/serverUrl"] == server.url
        assert "not-kept" not in panel.qt.settings.values()  # the password is never saved

        ui.nextSampleButton.click()
        _finish(panel.widget)
        assert ui.sampleLabel.text == "case-1" and ui.segmentSliceButton.enabled and ui.submitButton.enabled
        volume = panel.widget.logic.volumeNode()
        assert panel.shown["layers"][-1]["background"] is volume
        assert panel.editor.nodes == {"segmentation": panel.widget.logic.segmentationNode(), "source": volume}

        panel.widget.logic.jumpToSlice(3)
        ui.segmentSliceButton.click()
        _finish(panel.widget)
        assert ui.probabilityTable.rowCount == 1 and ui.probabilityTable.item(0, 0).text() == "3"
        assert ui.probabilityTable.item(0, 2).text() == "80" and ui.modelVersionLabel.text == "v3"
        assert ui.currentSliceLabel.text.startswith("slice 3: p(tumour) = ")
        import vtk

        corner = panel.red  # the Red view's corner says the same
        view = headless.SliceWidgetStandIn.views[corner.GetID()]
        assert view.cornerAnnotation().GetText(vtk.vtkCornerAnnotation.UpperRight) == ui.currentSliceLabel.text

        ui.segmentVolumeButton.click()
        _finish(panel.widget)
        assert ui.probabilityTable.rowCount == 6
        ui.probabilityTable.slots["cellDoubleClicked(int,int)"](5, 0)  # jumps to that slice
        assert panel.widget.logic.currentSliceIndex() == 5

        ui.editButton.click()
        assert panel.shown["modules"] == ["SegmentEditor"]
        assert panel.shown["errors"] == []


def test_unsaved_label_dialog_and_errors_become_dialogs(panel, monkeypatch):
    from LungNLBLib.testing import FakeServer

    ui, box = panel.ui, panel.qt.QMessageBox
    with FakeServer(_images()) as server:
        _connect(panel, server.url)
        ui.nextSampleButton.click()
        _finish(panel.widget)
        logic = panel.widget.logic
        logic.setMask(np.ones(logic.shape(), bool))  # the annotator's edit

        box.answers[:] = [box.Cancel]
        ui.nextSampleButton.click()
        assert panel.widget.task is None and ui.sampleLabel.text == "case-1"  # stayed
        assert "not submitted" in box.shown[-1]["text"]
        box.answers[:] = [box.Discard]
        ui.nextSampleButton.click()
        _finish(panel.widget)
        assert not logic.hasUnsavedEdits() and not logic.mask().all() and server.labels == {}  # loaded afresh
        assert [r["path"] for r in server.requests].count("/activelearning/disagreement") == 2

        # a deleted segment: a dialog that says what to do, the status says failed
        segmentation = logic.segmentationNode().GetSegmentation()
        segmentation.RemoveSegment(logic.segmentId())
        ui.submitButton.click()
        text, _ = panel.shown["errors"][-1]
        assert text.startswith("Submit label failed.") and "deleted" in text
        assert ui.statusLabel.text == "Submit label: failed"

        # a bug: its own dialog, with the traceback as details
        def broken():
            raise RuntimeError("boom")

        monkeypatch.setattr(logic, "segmentVolumeJob", broken)
        ui.segmentVolumeButton.click()
        text, details = panel.shown["errors"][-1]
        assert "unexpected error (RuntimeError: boom)" in text and "Traceback" in details


def test_cancel_discard_pending_and_training_poll(panel):
    from LungNLBLib.testing import FakeServer

    ui = panel.ui
    with FakeServer(_images()) as server:
        _connect(panel, server.url)
        ui.nextSampleButton.click()
        _finish(panel.widget)
        server.infer_delay.clear()  # the server "computes" until told otherwise
        ui.segmentVolumeButton.click()
        assert not ui.segmentSliceButton.enabled and ui.cancelRequestButton.visible
        ui.cancelRequestButton.click()
        _finish(panel.widget)
        assert ui.statusLabel.text.endswith(": cancelled") and ui.segmentSliceButton.enabled
        server.infer_delay.set()

        ui.epochsSpinBox.value = 2
        ui.trainButton.click()
        _finish(panel.widget)
        assert panel.widget.trainTimer.active
        assert server.requests[-1]["path"].startswith("/train/") and server.requests[-1]["params"]["max_epochs"] == 2
        _poll_training(panel.widget)  # the poll runs on its own worker thread, beside other requests
        assert ui.trainStatusLabel.text == "RUNNING: epoch 1/5" and panel.widget.trainTimer.active
        ui.stopTrainingButton.click()
        _finish(panel.widget)
        _poll_training(panel.widget)
        assert ui.trainStatusLabel.text == "STOPPED: epoch 1/5" and not panel.widget.trainTimer.active
    # the server is gone: the label is kept locally and the panel says so
    ui.submitButton.click()
    _finish(panel.widget)
    assert "kept locally" in panel.shown["errors"][-1][0]
    assert ui.pendingLabel.text.startswith("1 label(s) kept locally") and ui.discardPendingButton.enabled
    panel.qt.QInputDialog.choice = lambda names: names[0]
    ui.discardPendingButton.click()
    assert ui.pendingLabel.text.startswith("0 label(s)") and not ui.discardPendingButton.enabled
