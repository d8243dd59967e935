"""GuidedSeg: semi-supervised 3D organ segmentation (GuidedNet, Dual-KMax UX-Net) in 3D Slicer.

Only the module class for now; the panel (widget and logic) comes later.
Nothing heavy (torch, MONAI) is imported at module level.
"""

from slicer.ScriptedLoadableModule import *  # noqa: F401,F403


class GuidedSeg(ScriptedLoadableModule):  # noqa: F405
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)  # noqa: F405
        self.parent.title = "GuidedSeg"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["GuidedSeg developers"]
        self.parent.helpText = (
            "Semi-supervised 3D organ segmentation that learns from a few labeled and many "
            "unlabeled scans, using GuidedNet or Dual-KMax UX-Net. Segment a volume, correct "
            "the result in the Segment Editor, export the corrected labels and retrain. "
            "PyTorch and MONAI are installed on first use. "
            'See the <a href="https://github.com/guidedseg/SlicerGuidedSeg#readme">README</a> '
            "for usage and headless training."
        )
        self.parent.acknowledgementText = (
            "GuidedNet: Zhao et al., \"GuidedNet: Semi-Supervised Multi-Organ Segmentation via "
            "Labeled Data Guide Unlabeled Data\". Dual-KMax UX-Net. Built with "
            '<a href="https://monai.io">MONAI</a> and '
            '<a href="https://www.slicer.org">3D Slicer</a>.'
        )
        # Stays hidden from the module list until the panel (widget) lands.
        self.parent.hidden = True
