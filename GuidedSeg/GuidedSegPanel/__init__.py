"""The GuidedSeg panel's parts, one job per module.

Plain Python (importable in pytest with slicer-core; no Qt):
    process     child process runner: progress lines, Cancel of the whole process group
    commands    the command lines of segment / train / device probe and their environment
    models      the bundles in a models folder, with labels and validation Dice
    terminology standard codes (SNOMED CT) for segment names
    nodes       MRML nodes <-> files (volume out, label map in, segmentation out)
    export      which organs an export records as annotated, and writing it into a case store
    jobs        a Segment or Train run: files, child process, result
    logic       the facade the widget drives: settings, models, jobs, export, state
    parameters  the panel's settings in the scene's parameter node
    state       what the panel shows and enables, from plain inputs
    install     PyTorch / MONAI on demand, after asking
    selftest    a tiny untrained bundle for the self-test and end-to-end tests
Qt (inside Slicer only):
    widget      the panel itself, built from Resources/UI/GuidedSeg.ui
"""
