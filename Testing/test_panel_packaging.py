"""What Slicer's ExtensionsIndex checks, checked here: the LICENSE, the icon and screenshots the
CMake metadata names (committed, real PNGs), the catalog entry JSON against the metadata, and
ctest wiring that runs the module's self-test."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CMAKE = (ROOT / "CMakeLists.txt").read_text()
RAW = "https://raw.githubusercontent.com/guidedseg/SlicerGuidedSeg/main/"
#: the catalog-entry schema v1.0.1 allows these keys only ("additionalProperties": false)
CATALOG_KEYS = {"$schema", "build_dependencies", "build_subdirectory", "category", "enabled", "scm_revision",
                "scm_type", "scm_url", "tier"}


def cmake_value(name: str) -> str:
    match = re.search(rf'set\({name}\s+"([^"]*)"', CMAKE)
    assert match, f"CMakeLists.txt does not set {name}"
    return match.group(1)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_license_is_apache_2_as_pyproject_says():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert 'license = { text = "Apache-2.0" }' in (ROOT / "pyproject.toml").read_text()


def test_icon_and_screenshots_named_in_cmake_are_committed_pngs():
    icon = cmake_value("EXTENSION_ICONURL")
    assert icon.startswith(RAW) and png_size(ROOT / icon[len(RAW):]) == (128, 128)
    shots = cmake_value("EXTENSION_SCREENSHOTURLS").split()
    assert shots
    for url in shots:
        assert url.startswith(RAW), url
        width, height = png_size(ROOT / url[len(RAW):])
        assert width >= 300 and height >= 200, (url, width, height)
    readme = (ROOT / "README.md").read_text()
    for url in shots:  # the README shows them too
        assert url[len(RAW):] in readme, url


def test_catalog_entry_matches_the_metadata():
    entry = json.loads((ROOT / "GuidedSeg.json").read_text())
    assert set(entry) <= CATALOG_KEYS and {"$schema", "category", "scm_url"} <= set(entry)
    assert "catalog-entry-schema-v1.0.1.json" in entry["$schema"]
    assert entry["category"] == cmake_value("EXTENSION_CATEGORY")
    assert entry["scm_url"].removesuffix(".git") == cmake_value("EXTENSION_HOMEPAGE")
    depends = cmake_value("EXTENSION_DEPENDS")
    assert sorted(entry["build_dependencies"]) == sorted([] if depends == "NA" else depends.split())


def test_ctest_runs_the_self_test_and_the_panel_suites():
    assert re.search(r"if\(BUILD_TESTING\)\s*add_subdirectory\(Testing\)", CMAKE)
    testing = (ROOT / "Testing" / "CMakeLists.txt").read_text()
    script = re.search(r"slicer_add_python_test\(\s*SCRIPT (\S+)", testing).group(1)
    runner = (ROOT / "Testing" / script).read_text()
    assert "return 77" in runner and "SKIP_RETURN_CODE 77" in testing
    for suite in re.findall(r'"(test_panel_\w+\.py)"', runner):
        assert (ROOT / "Testing" / suite).is_file(), suite
    module = (ROOT / "GuidedSeg" / "CMakeLists.txt").read_text()
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in module
