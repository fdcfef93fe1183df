"""The LungNLB module on Slicer's MRML libraries without the Slicer application: the smallest stand-ins it needs.

`slicer-core` (PyPI) gives Slicer's MRML, Volumes, Colors and Segmentations logic without Qt. What the module
file imports beyond that is stood in for here: `qt` (an empty module, or `qt_stand_in` when a test drives the
widget), ScriptedLoadableModule's base classes (the parameter node made as Slicer 5.2 makes it), `slicer.app`
(a settings path and a layout manager that hands out the Red slice node) and `slicer.modules` (the real
logics). Used by tests/test_slicer_module.py and experiments/slicer_screenshot.py; not installed with the
extension (Slicer itself has all of this).
"""

import os
import sys
import types
import unittest

import slicer  # slicer-core
import slicer.util  # noqa: F401  (loads Slicer's util module onto slicer)


class ScriptedLogicStandIn:
    """ScriptedLoadableModuleLogic as Slicer 5.2 defines it, reduced to the singleton parameter node."""

    def __init__(self, parent=None):
        self.moduleName = self.__class__.__name__[: -len("Logic")]

    def getParameterNode(self):
        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)
            node.SetSingletonTag(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            node = slicer.mrmlScene.AddNode(node)
        return node


class ScriptedWidgetStandIn:
    """ScriptedLoadableModuleWidget reduced to what a module's ``setup`` uses: ``layout`` and ``resourcePath``."""

    def __init__(self, parent=None):
        self.parent = parent

    def setup(self):
        self.layout = types.SimpleNamespace(addWidget=lambda widget: None)

    def resourcePath(self, filename):
        return os.path.join(os.path.dirname(sys.modules[type(self).__module__].__file__), "Resources", filename)


class SliceViewStandIn:
    """The Red view: a real vtkCornerAnnotation, no rendering."""

    def __init__(self):
        import vtk

        self._corner = vtk.vtkCornerAnnotation()

    def cornerAnnotation(self):
        return self._corner

    def forceRender(self):
        pass


class SliceWidgetStandIn:
    views = {}  # one view per slice node, kept for the scene's life

    def __init__(self, node):
        self._node = node

    def mrmlSliceNode(self):
        return self._node

    def sliceView(self):
        return self.views.setdefault(self._node.GetID(), SliceViewStandIn())


class LayoutManagerStandIn:
    def sliceWidget(self, name):
        node = slicer.mrmlScene.GetNodeByID("vtkMRMLSliceNode" + name)  # Slicer's IDs for its slice views
        return SliceWidgetStandIn(node) if node is not None else None


def install(settings_file, qt_module=None):
    """A fresh scene with the Colors, Volumes and Segmentations logics and a Red slice node; the stand-ins in
    ``sys.modules`` / on ``slicer``. Returns (scene, red slice node). ``settings_file``: where the module's
    ``slicer.app.slicerUserSettingsFilePath`` points (its pending labels go beside it)."""
    sys.modules["qt"] = qt_module or types.ModuleType("qt")
    base = types.ModuleType("slicer.ScriptedLoadableModule")
    base.ScriptedLoadableModule = type("ScriptedLoadableModule", (), {"__init__": lambda self, parent=None: None})
    base.ScriptedLoadableModuleWidget = ScriptedWidgetStandIn
    base.ScriptedLoadableModuleLogic = ScriptedLogicStandIn
    base.ScriptedLoadableModuleTest = unittest.TestCase
    sys.modules["slicer.ScriptedLoadableModule"] = base
    slicer.ScriptedLoadableModule = base

    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    logics = {}
    for name, cls in (("Colors", slicer.vtkSlicerColorLogic), ("Volumes", slicer.vtkSlicerVolumesLogic),
                      ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic)):
        logic = cls()
        logic.SetMRMLApplicationLogic(app_logic)
        logic.SetMRMLScene(scene)
        app_logic.SetModuleLogic(name, logic)
        logics[name] = logic
    slicer.mrmlScene = scene
    slicer.app = types.SimpleNamespace(
        slicerUserSettingsFilePath=str(settings_file),
        layoutManager=lambda: LayoutManagerStandIn(),
        applicationLogic=lambda: app_logic,  # the module logics keep a raw pointer to it: it must outlive them
    )
    slicer.modules = types.SimpleNamespace(
        volumes=types.SimpleNamespace(logic=lambda: logics["Volumes"]),
        segmentations=types.SimpleNamespace(logic=lambda: logics["Segmentations"]),
    )
    red = slicer.vtkMRMLSliceNode()
    red.SetSingletonTag("Red")
    red.SetName("Red")
    red.SetLayoutName("Red")
    red.SetOrientationToAxial()
    red = scene.AddNode(red)
    SliceWidgetStandIn.views = {}
    return scene, red
