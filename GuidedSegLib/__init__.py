"""GuidedSegLib: everything GuidedSeg does outside 3D Slicer (no Slicer or Qt import here).

Image I/O, preprocessing, the case store, synthetic phantoms and the ``guidedseg`` CLI.
Heavy packages (torch, MONAI) are imported only by the modules that need them.
"""

__version__ = "0.1.0"
