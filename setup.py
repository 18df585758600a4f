"""Package discovery for the wheel; all other metadata is in pyproject.toml.

passes/ and targets/ sit at the top level but install as qcompiler.passes and qcompiler.targets.
pyproject's [tool.setuptools.packages.find] cannot give discovered packages another name, so the
packages are found here: every directory with an __init__.py under each root, named after the root's
installed name. A new subpackage lands in the wheel without editing any list.
"""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
# installed package name -> source directory (relative to the project root)
ROOTS = {"qcompiler": "qcompiler", "qcompiler.passes": "passes", "qcompiler.targets": "targets"}


def packages() -> list[str]:
    found = []
    for name, src in ROOTS.items():
        found.append(name)
        found += [f"{name}.{sub}" for sub in find_packages(str(HERE / src))]
    return sorted(set(found))


setup(packages=packages(), package_dir=ROOTS)
