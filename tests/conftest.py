"""Shared fixtures: the tiny offline model and data sets, built once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # recipes (train_scripts/, eval/) are importable from a checkout too
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from sd_memfree.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    from sd_memfree.tiny import make_tiny_dataset

    return make_tiny_dataset(tmp_path_factory.mktemp("tiny-data") / "data", num_images=8, size=32,
                             duplicate_fraction=0.25, duplicate_times=3, seed=0)
