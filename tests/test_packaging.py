"""The wheel holds the whole source tree.

passes/ and targets/ install as qcompiler.passes and qcompiler.targets, so a package list kept by
hand once left qcompiler/codebook/ out of the wheel and `qc passes` died on import after a normal
install. This builds the wheel (no network: the venv's setuptools, no build isolation) from a copy of
the sources, so a stale build/ in the checkout cannot hide a missing file, and compares it with the
tree: every directory with an __init__.py under qcompiler/, passes/, targets/ (under its installed
name) with all its modules, every targets/*.toml, and the `qc` entry point.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source directory -> installed package name (the mapping in setup.py, restated to check it)
ROOTS = {"qcompiler": "qcompiler", "passes": "qcompiler.passes", "targets": "qcompiler.targets"}
BUILD_FILES = ["pyproject.toml", "setup.py", "setup.cfg", "README.md", "LICENSE"]


def source_packages() -> dict[str, Path]:
    """Installed package name -> source directory, for every directory holding an __init__.py."""
    found = {}
    for src, name in ROOTS.items():
        for init in (ROOT / src).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / src)
            found[".".join([name, *rel.parts])] = init.parent
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in BUILD_FILES:
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    for d in ROOTS:
        shutil.copytree(ROOT / d, src / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    run = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"), "."],
        cwd=src, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, f"pip wheel failed:\n{run.stdout}\n{run.stderr}"
    (whl,) = (tmp / "dist").glob("qcompiler-*.whl")
    with zipfile.ZipFile(whl) as z:
        yield z


def test_every_package_and_module_is_in_the_wheel(wheel):
    names = set(wheel.namelist())
    packages = source_packages()
    assert set(ROOTS.values()) <= set(packages)
    missing = []
    for pkg, d in sorted(packages.items()):
        prefix = pkg.replace(".", "/")
        missing += [f"{prefix}/{f.name}  (from {f.relative_to(ROOT)})" for f in sorted(d.glob("*.py"))
                    if f"{prefix}/{f.name}" not in names]
    assert not missing, "the wheel lacks:\n" + "\n".join(missing)


def test_target_files_are_in_the_wheel(wheel):
    names = set(wheel.namelist())
    tomls = sorted((ROOT / "targets").glob("*.toml"))
    assert tomls
    missing = [f"qcompiler/targets/{t.name}" for t in tomls if f"qcompiler/targets/{t.name}" not in names]
    assert not missing, f"the wheel lacks {missing}"


def test_only_qcompiler_is_installed(wheel):
    tops = {n.split("/")[0] for n in wheel.namelist()}
    assert "qcompiler" in tops and all(t == "qcompiler" or t.endswith(".dist-info") for t in tops), (
        f"unexpected top-level entries in the wheel: {sorted(tops)}")


def test_qc_entry_point_is_declared(wheel):
    (ep,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    cfg = configparser.ConfigParser()
    cfg.read_string(wheel.read(ep).decode())
    assert cfg.has_option("console_scripts", "qc"), "the wheel declares no `qc` console script"
    assert cfg.get("console_scripts", "qc").strip() == "qcompiler.cli:main"


def test_tests_import_packages_by_their_installed_names():
    """`passes.x` also imports from the checkout (the test root is on sys.path), as a second copy
    of `qcompiler.passes.x`: its passes replace the registered ones for the rest of the session,
    and a file changed since the session first imported it runs against the older modules
    already loaded (an ImportError in a long run while the file was being edited)."""
    source_name = re.compile(rf"^\s*(?:from|import)\s+({'|'.join(d for d, name in ROOTS.items() if d != name)})\b.*$", re.MULTILINE)
    found = [f"{path.relative_to(ROOT)}: {match.group(0).strip()}" for path in sorted((ROOT / "tests").rglob("*.py"))
             for match in source_name.finditer(path.read_text())]
    assert not found, "import these by their installed names (qcompiler.passes, qcompiler.targets):\n" + "\n".join(found)
