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
import unittest

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
            "<b>Segment</b>: choose a volume and a model bundle from the models folder (or import one, or train a "
            "starter model on synthetic phantoms), then click Segment; it runs in the background (Cancel stops it) "
            "and gives a new segmentation with named, coloured segments, so earlier corrections are never lost "
            "(tick \"Segment into this segmentation\" to replace one instead; it asks when that holds corrections)."
            "<br>"
            "<b>Correct</b> it in the Segment Editor.<br>"
            "<b>Export corrected labels</b> writes the volume and the corrected label map into a case store: the "
            "segments you edited, plus the organs you tick as checked, count as annotated; the rest stay unknown "
            "to training. Without the model's draft nothing counts as edited: tick what you reviewed.<br>"
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
    """Two tests. Without PyTorch: a segmentation with its model draft, an edit, and an export into
    a new case store record exactly the edited and ticked organs; with the draft gone nothing
    counts as edited. With PyTorch and MONAI: the whole loop on a phantom (load a store case,
    segment it with a tiny bundle in a child process, edit, export); without them it reports
    "skipped", never "passed"."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_export_records_what_was_edited()
        self.setUp()
        try:
            self.test_segment_correct_export()
        except unittest.SkipTest as skipped:
            self.delayDisplay(f"test_segment_correct_export skipped: {skipped}")

    def test_export_records_what_was_edited(self):
        import json

        import numpy as np
        import SimpleITK as sitk
        from GuidedSegPanel import export, nodes

        from GuidedSegLib.store import CaseStore

        self.delayDisplay("Export without PyTorch: a draft, an edit, a new case store")
        scene, segmentations_logic = slicer.mrmlScene, slicer.modules.segmentations.logic()
        names = {1: "liver", 2: "spleen", 3: "kidney"}
        label = np.zeros((20, 32, 30), np.uint8)
        label[4:14, 5:20, 4:18], label[6:12, 20:28, 20:27], label[8:16, 8:14, 21:28] = 1, 2, 3
        image = sitk.GetImageFromArray((label * 40 - 100 + np.indices(label.shape)[0]).astype(np.int16))
        image.SetSpacing((1.5, 1.2, 3.0))
        image.SetOrigin((-20.0, 14.5, 7.25))
        volume = nodes.image_to_volume(image, scene, "GuidedSeg self-test volume")
        draft = sitk.GetImageFromArray(label)
        draft.CopyInformation(image)
        segmentation = nodes.label_to_segmentation(draft, names, None, volume, scene, segmentations_logic,
                                                   node_name="GuidedSeg self-test")
        nodes.set_draft(segmentation, label, volume, scene)
        segmentation.SetAttribute(export.DRAFT_LABELS_ATTRIBUTE, json.dumps({str(v): n for v, n in names.items()}))

        liver = segmentation.GetSegmentation().GetSegmentIdBySegmentName("liver")
        edited = label == 1
        edited[4:7] = False  # the annotator erased a leak
        slicer.util.updateSegmentBinaryLabelmapFromArray(edited.astype(np.uint8), segmentation, liver, volume)

        store = CaseStore.create(os.path.join(tempfile.mkdtemp(prefix="GuidedSegSelfTest-",
                                                               dir=slicer.app.temporaryPath), "store"), names)
        plan = export.plan_export(segmentation, volume, store, segmentations_logic, scene)
        self.assertEqual(plan.edited, [1])
        stored = export.perform_export(plan, store, checked=[3])
        self.assertEqual((stored.annotated, stored.absent), ((1, 3), ()))
        written = sitk.GetArrayFromImage(sitk.ReadImage(str(stored.label)))
        self.assertTrue(np.array_equal(written == 1, edited), "the stored liver is not the edited one")
        self.assertTrue(np.array_equal(written == 3, label == 3) and not np.any(written == 2),
                        "an unticked organ entered the label")

        self.delayDisplay("With the draft gone nothing counts as edited")
        scene.RemoveNode(nodes.draft_node(segmentation))
        plan = export.plan_export(segmentation, volume, store, segmentations_logic, scene)
        self.assertEqual(plan.edited, [])
        with self.assertRaises(export.ExportRefused):
            export.perform_export(plan, store)
        self.delayDisplay("Export test passed")

    def test_segment_correct_export(self):
        import numpy as np
        from GuidedSegPanel import install
        from GuidedSegPanel.commands import child_environment
        from GuidedSegPanel.selftest import tiny_bundle_command

        missing = install.missing()
        if missing:
            self.skipTest("Slicer's Python lacks " + ", ".join(r.package for r in missing)
                          + " (install them from the GuidedSeg panel)")
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
