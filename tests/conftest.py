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
    from sd_memfree.testing.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    from sd_memfree.testing.tiny import make_tiny_dataset

    return make_tiny_dataset(tmp_path_factory.mktemp("tiny-data") / "data", num_images=8, size=32,
                             duplicate_fraction=0.25, duplicate_times=3, seed=0)


@pytest.fixture(scope="session")
def model20(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with a 20-timestep scheduler, so AGC's loss banks fill up in a few steps."""
    from helpers import with_train_timesteps

    return with_train_timesteps(tiny_model_dir, tmp_path_factory.mktemp("model20") / "m", 20)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    from sd_memfree.testing.tiny import make_tiny_sdxl_model

    return make_tiny_sdxl_model(tmp_path_factory.mktemp("tiny-sdxl") / "model", seed=0)


@pytest.fixture(scope="session")
def sdxl20(tiny_sdxl_dir, tmp_path_factory) -> Path:
    """The tiny SDXL model with a 20-timestep scheduler, so AGC's loss banks fill up in a few steps."""
    from helpers import with_train_timesteps

    return with_train_timesteps(tiny_sdxl_dir, tmp_path_factory.mktemp("sdxl20") / "m", 20)


CHROMIUM = __import__("shutil").which("chromium") or __import__("shutil").which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian package `chromium`)")


def images_loaded_in_chromium(report: Path, workdir: Path) -> str:
    """Render ``report`` moved out of its folder (so only embedded data counts) in headless
    Chromium and return one digit per <img>: 1 if it decoded (naturalWidth > 0), else 0. A
    deliberately broken image is appended, so a correct probe always ends in '0'."""
    import subprocess

    page = workdir / "moved.html"
    probe = ("<img id='broken' src='data:image/png;base64,AAAA'><script>window.addEventListener('load',()=>{"
             "document.body.setAttribute('data-imgs',[...document.images].map(i=>i.naturalWidth>0?1:0).join(''));});</script>")
    page.write_text(report.read_text().replace("</body>", probe + "</body>"))
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={workdir / 'profile'}", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    marker = 'data-imgs="'
    return dom[dom.index(marker) + len(marker):].split('"', 1)[0] if marker in dom else ""
