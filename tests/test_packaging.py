"""What `pip install` ships: one top-level package, ``sd_memfree``, with the recipes inside as
``sd_memfree.recipes`` (the repository's train_scripts/) and the test scaffolding as
``sd_memfree.testing``; no ``train_scripts`` or ``eval`` top-level package.

The wheel and the editable wheel are built offline with the installed setuptools (the PEP 517
backend pyproject.toml names, called as a frontend would) from a copy of the sources, so a stale
build/ folder in the checkout cannot leak files into the wheel.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "sd_memfree", "train_scripts", "eval")


def _setuptools_too_old() -> str | None:
    try:
        import setuptools
    except ImportError:
        return "the build backend (setuptools) is not installed"
    need = re.search(r'"setuptools>=([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    have = tuple(int(x) for x in re.findall(r"\d+", setuptools.__version__)[:2])
    if have < tuple(int(x) for x in need.split("."))[:2]:
        return f"setuptools {setuptools.__version__} is older than the build backend pyproject.toml needs ({need})"
    return None


pytestmark = pytest.mark.skipif(_setuptools_too_old() is not None, reason=str(_setuptools_too_old()))


def _build(hook: str, tmp: Path) -> zipfile.ZipFile:
    """Copies the sources to ``tmp/src`` and runs setuptools' PEP 517 ``hook`` there, offline."""
    src = tmp / "src"
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    out = tmp / "dist"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", f"import setuptools.build_meta as b; print(b.{hook}({str(out)!r}))"],
                          cwd=src, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return zipfile.ZipFile(out / proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    return _build("build_wheel", tmp_path_factory.mktemp("wheel"))


def test_wheel_holds_only_sd_memfree(wheel):
    names = wheel.namelist()
    top = {n.split("/")[0] for n in names}
    dist_info = [t for t in top if t.endswith(".dist-info")]
    assert len(dist_info) == 1 and dist_info[0].startswith("sd_memfree-")
    assert top == {"sd_memfree", dist_info[0]}
    assert wheel.read(f"{dist_info[0]}/top_level.txt").decode().split() == ["sd_memfree"]
    assert "sd-memfree = sd_memfree.cli:main" in wheel.read(f"{dist_info[0]}/entry_points.txt").decode()
    assert not any(n.startswith(("train_scripts/", "eval/", "tests/", "benchmarks/")) for n in names)


def test_wheel_has_every_library_module_the_recipes_and_the_scaffolding(wheel):
    names = set(wheel.namelist())
    # Packages are listed by hand in pyproject.toml: a new subpackage must not be left out.
    library = {p.relative_to(REPO).as_posix() for p in (REPO / "sd_memfree").rglob("*.py")}
    assert library - names == set()
    recipes = {f"sd_memfree/recipes/{p.name}" for p in (REPO / "train_scripts").glob("*.py")}
    assert {"sd_memfree/recipes/__init__.py", "sd_memfree/recipes/train_sd_ietagc.py",
            "sd_memfree/recipes/train_sdxl_ietagc.py", "sd_memfree/recipes/demo.py"} <= recipes
    assert recipes - names == set()
    assert {"sd_memfree/testing/__init__.py", "sd_memfree/testing/tiny.py", "sd_memfree/testing/standin.py"} <= names
    assert "sd_memfree/tiny.py" not in names and "sd_memfree/scoring/standin.py" not in names


def test_editable_install_maps_the_same_two_packages(tmp_path):
    """`pip install -e .` (Makefile, CI) imports sd_memfree from the checkout and
    sd_memfree.recipes from train_scripts/, and adds no other top-level name."""
    editable = _build("build_editable", tmp_path)
    finder = [n for n in editable.namelist() if n.startswith("__editable__") and n.endswith("_finder.py")]
    assert len(finder) == 1, editable.namelist()
    source = editable.read(finder[0]).decode()
    mapping = ast.literal_eval(re.search(r"^MAPPING[^=]*=\s*(\{.*?\})\s*$", source, re.M).group(1))
    src = (tmp_path / "src").resolve()
    assert mapping == {"sd_memfree": str(src / "sd_memfree"), "sd_memfree.recipes": str(src / "train_scripts")}


def test_installed_recipes_run_from_the_wheel(wheel, tmp_path):
    """From the unpacked wheel alone (not the checkout), `sd-memfree train-sdxl` imports the SDXL
    recipe and, through it, its sibling the SD recipe (the run lock and the model-folder check),
    then stops on the bad model folder with its one-line error."""
    site = tmp_path / "site"
    wheel.extractall(site)
    empty_model = tmp_path / "not-a-model"
    empty_model.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # train_scripts/eval made unimportable: a development install of the checkout may still serve them.
    code = ("import sys; sys.modules['train_scripts'] = sys.modules['eval'] = None; import sd_memfree, sd_memfree.cli as c; "
            f"assert sd_memfree.__file__.startswith({str(site)!r}), sd_memfree.__file__; c.main(sys.argv[1:])")
    proc = subprocess.run([sys.executable, "-c", code, "train-sdxl", f"--pretrained_model_name_or_path={empty_model}",
                           f"--train_data_dir={tmp_path / 'no-data'}", f"--output_dir={tmp_path / 'out'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and str(empty_model) in proc.stderr
    assert not (tmp_path / "out").exists()  # bad input leaves no trace


def test_recipes_never_import_train_scripts_or_eval_by_name():
    """Installed, the recipes are sd_memfree.recipes and no train_scripts/eval package exists: a
    recipe reaches a sibling relatively (imported) or by its bare name (run as a file)."""
    offenders = []
    for path in sorted((REPO / "train_scripts").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] in ("train_scripts", "eval")]
    assert offenders == []
