"""Shared fixtures: the bundled model, its calibration data, and CIFAR-10 test data from ../shared."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
BUNDLED_MODEL = ROOT / "models" / "cifar10_resnet20.onnx"
BUNDLED_CALIB = ROOT / "models" / "cifar10_calib.npz"


def _load_make_npz():
    spec = importlib.util.spec_from_file_location("make_cifar10_npz", ROOT / "models" / "make_cifar10_npz.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def _layer_speed_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("xdg-cache")


@pytest.fixture(autouse=True)
def _cache_in_tmp(_layer_speed_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ort-cpu times weight layers and caches the figures under $XDG_CACHE_HOME: tests (and the
    `qc` processes they start) write there, in one folder per session, never in the user's cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(_layer_speed_cache))


@pytest.fixture(scope="session")
def bundled_model() -> Path:
    return BUNDLED_MODEL


@pytest.fixture(scope="session")
def bundled_calib() -> Path:
    return BUNDLED_CALIB


@pytest.fixture(scope="session")
def cifar_test_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 2,000 CIFAR-10 test images, preprocessed, with labels (needs ../shared)."""
    source = SHARED / "data" / "cifar10_test.npz"
    if not source.exists():
        pytest.skip(f"{source} not available")
    arrays = _load_make_npz().make(source, 2000)
    path = tmp_path_factory.mktemp("data") / "cifar10_test2000.npz"
    np.savez(path, **arrays)
    return path
