"""Run the panel's Qt-free pytest suites inside 3D Slicer (ctest: Testing/CMakeLists.txt).

    Slicer --no-splash --testing --python-script Testing/run_panel_tests_in_slicer.py Testing/

Exits 77 (ctest's "skipped") when Slicer's Python has no pytest; otherwise with pytest's status.
"""

import importlib.util
import sys
from pathlib import Path

SUITES = ("test_panel_nodes.py", "test_panel_logic.py", "test_panel_state.py", "test_panel_loading.py",
          "test_panel_selftest.py")


def main(folder: str) -> int:
    if importlib.util.find_spec("pytest") is None:
        print("skipped: Slicer's Python has no pytest (PythonSlicer -m pip install pytest)")
        return 77
    import pytest

    return int(pytest.main(["-q", "-p", "no:cacheprovider", *(str(Path(folder) / s) for s in SUITES)]))


if __name__ == "__main__":
    status = main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parent))
    try:
        import slicer.util

        slicer.util.exit(status)  # inside Slicer: quit the application with this status
    except (ImportError, AttributeError):
        sys.exit(status)
