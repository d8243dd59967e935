"""GuidedSeg: semi-supervised 3D organ segmentation (GuidedNet) in 3D Slicer.

This file is thin: the module's description, a widget that embeds the panel, the logic Slicer's
conventions expect, and the self-test. The panel's parts live in GuidedSegPanel/ (one job per
file); the library (GuidedSegLib) runs Segment and Train in child processes. Nothing heavy
(torch, MONAI) is imported here or by the panel.
"""

import os
import subprocess
import sys
import tempfile
import time

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

_PANEL_PACKAGE = "GuidedSegPanel"


class GuidedSeg(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "GuidedSeg"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["GuidedSeg developers"]
        self.parent.helpText = (
            "Semi-supervised 3D organ segmentation that learns from a few labeled and many unlabeled scans "
            "(GuidedNet, with supervised-only and cross-pseudo-supervision baselines).<br><br>"
            "<b>Segment</b>: choose a volume and a model bundle from the models folder, then click Segment; it runs "
            "in the background (Cancel stops it) and gives a segmentation with named, coloured segments.<br>"
            "<b>Correct</b> it in the Segment Editor.<br>"
            "<b>Export corrected labels</b> writes the volume and the corrected label map into a case store: the "
            "segments you edited, plus the organs you tick as checked, count as annotated; the rest stay unknown "
            "to training.<br>"
            "<b>Train</b> learns a new model bundle from the store in the background.<br><br>"
            "PyTorch and MONAI are installed on first use, after asking. "
            'See the <a href="https://github.com/guidedseg/SlicerGuidedSeg#readme">README</a> '
            "for usage and headless training."
        )
        self.parent.acknowledgementText = (
            "GuidedNet: Zhao et al., \"GuidedNet: Semi-Supervised Multi-Organ Segmentation via "
            "Labeled Data Guide Unlabeled Data\". Built with "
            '<a href="https://monai.io">MONAI</a> and '
            '<a href="https://www.slicer.org">3D Slicer</a>.'
        )


class GuidedSegWidget(ScriptedLoadableModuleWidget):
    """Embeds the panel (GuidedSegPanel.widget.PanelWidget) built from Resources/UI/GuidedSeg.ui."""

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        from GuidedSegPanel.widget import PanelWidget

        self.logic = GuidedSegLogic()  # slicer.util.getModuleLogic("GuidedSeg") returns the widget's .logic
        self.panel = PanelWidget(self.resourcePath("UI/GuidedSeg.ui"))
        self.layout.addWidget(self.panel.widget)
        self.layout.addStretch(1)

    def cleanup(self):
        # runs twice on a reload (onReload below, then Slicer's reloadScriptedModule): once is enough
        panel, self.panel = getattr(self, "panel", None), None
        if panel is not None:
            panel.cleanup()

    def onReload(self):
        """Reload the panel's package too, not just this file (developer mode)."""
        self.cleanup()
        for name in [n for n in sys.modules if n == _PANEL_PACKAGE or n.startswith(_PANEL_PACKAGE + ".")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)


class GuidedSegLogic(ScriptedLoadableModuleLogic):
    """Slicer-side entry to the panel logic (GuidedSegPanel.logic.PanelLogic) for scripts:

        logic = slicer.util.getModuleLogic("GuidedSeg").panel()
    """

    def panel(self, **kwargs):
        from GuidedSegPanel.logic import PanelLogic

        kwargs.setdefault("work_root", slicer.app.temporaryPath)
        return PanelLogic(slicer.mrmlScene, slicer.modules.segmentations.logic(), **kwargs)


class GuidedSegTest(ScriptedLoadableModuleTest):
    """The whole loop on a phantom: load a store case, segment it with a tiny bundle in a child
    process, edit a segment, export, and check the store recorded exactly that."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_segment_correct_export()

    def test_segment_correct_export(self):
        import numpy as np
        from GuidedSegPanel import install
        from GuidedSegPanel.commands import child_environment
        from GuidedSegPanel.selftest import tiny_bundle_command

        missing = install.missing()
        if missing:
            self.delayDisplay("Skipped: Slicer's Python lacks " + ", ".join(r.package for r in missing)
                              + " (install them from the GuidedSeg panel)")
            return
        from GuidedSegLib.labels import FLARE22_LABELS
        from GuidedSegLib.phantoms import write_phantom_store
        from GuidedSegLib.store import CaseStore

        logic = GuidedSegLogic().panel()
        work = tempfile.mkdtemp(prefix="GuidedSegSelfTest-", dir=slicer.app.temporaryPath)
        self.delayDisplay("Writing a phantom store and a tiny model bundle")
        write_phantom_store(os.path.join(work, "store"), cases=2, labeled=1, test=0, seed=5, size=(48, 48, 32))
        models_folder = os.path.join(work, "models")
        os.makedirs(models_folder)
        bundle = os.path.join(models_folder, "tiny")
        subprocess.run(tiny_bundle_command(logic.python, bundle, FLARE22_LABELS), check=True, env=child_environment())

        store = CaseStore(os.path.join(work, "store"))
        case = store.cases("unlabeled")[0]
        volume = slicer.util.loadVolume(str(case.image))
        logic.set_models_folder(models_folder)
        p = logic.parameters
        p.input_volume, p.model, p.store = volume, bundle, str(store.root)

        self.delayDisplay("Segmenting in a child process")
        logic.start_segment()
        final, deadline = None, time.monotonic() + 300
        while final is None:
            self.assertLess(time.monotonic(), deadline, "Segment did not finish in 5 minutes")
            slicer.app.processEvents()
            final = next((u for u in logic.poll() if u.finished), None)
            time.sleep(0.05)
        self.assertTrue(final.ok, final.error)
        segmentation = p.segmentation
        names = [segmentation.GetSegmentation().GetNthSegment(i).GetName()
                 for i in range(segmentation.GetSegmentation().GetNumberOfSegments())]
        self.assertEqual(sorted(names), sorted(FLARE22_LABELS.values()))

        self.delayDisplay("Editing the liver")
        liver = segmentation.GetSegmentation().GetSegmentIdBySegmentName("liver")
        mask = np.zeros(slicer.util.arrayFromVolume(volume).shape, np.uint8)
        mask[10:20, 15:30, 15:30] = 1
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, liver, volume)

        self.delayDisplay("Exporting")
        plan = logic.plan_export()
        self.assertEqual(plan.action, "ingest")
        self.assertEqual(plan.case_id, case.case_id)
        self.assertIn(1, plan.edited)
        stored = logic.export(plan, checked=[3])  # the spleen: ticked as checked
        self.assertEqual(stored.kind, "labeled")
        self.assertIn(1, stored.annotated)
        self.assertEqual(set(stored.annotated) | set(stored.absent), set(plan.edited) | {3})
        label = slicer.util.arrayFromVolume(slicer.util.loadLabelVolume(str(stored.label)))
        self.assertFalse(np.any((label == 1) & (mask == 0)), "liver outside the painted box")
        self.assertTrue(np.all(np.isin(label[mask == 1], (1, 3))), "painted liver lost to an unticked organ")
        self.assertEqual(CaseStore(store.root).case(case.case_id).history[-1]["model"], "tiny-selftest")
        self.delayDisplay("Test passed")
