"""The wheel ships the prompt sets and the web page as package data, and an installed wheel
(no source checkout) finds them and runs the `mlx-refusal` console script."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib.util import find_spec
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUILD_INPUTS = ("setup.cfg", "setup.py", "pyproject.toml", "README.md", "cli.py", "mlx_refusal", "prompts", "export")
# build outputs and caches that may sit in a checkout and must never reach the wheel
NOT_SHIPPED = ("node_modules", "vendor", "__pycache__")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the checkout (a build in place would leave build/ and
    *.egg-info behind), with a page runtime installed in the copy as setup_web.sh leaves it."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns(*NOT_SHIPPED, "*.egg-info", "*.so"))
        else:
            shutil.copy2(REPO / name, src / name)
    for built in ("node_modules/onnxruntime-web/dist/ort.wasm.min.mjs", "vendor/ort/ort.wasm.min.mjs"):
        (src / "export" / built).parent.mkdir(parents=True)
        (src / "export" / built).write_text("// runtime")
    # without the build isolation pip fetches nothing, but setuptools < 70.1 needs the `wheel` package
    isolation = ["--no-build-isolation"] if find_spec("wheel") else []
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", *isolation, "-w", str(root / "dist"),
                    str(src)], check=True, capture_output=True, text=True)
    (built,) = (root / "dist").glob("mlx_refusal-*.whl")
    return built


def _top_level_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}


def test_the_wheel_carries_the_prompts_and_the_page_but_no_build_outputs(wheel):
    from mlx_refusal.serve import PAGE_FILES

    names = set(zipfile.ZipFile(wheel).namelist())
    prompts = {n.removeprefix("mlx_refusal/data/prompts/") for n in names if n.startswith("mlx_refusal/data/prompts/")}
    page = {n.removeprefix("mlx_refusal/data/export/") for n in names if n.startswith("mlx_refusal/data/export/")}
    assert prompts == _top_level_files(REPO / "prompts")
    assert {"harmful.jsonl", "harmless.jsonl", "capability.txt"} <= prompts
    # the page, and what `install_runtime` runs `npm ci` from
    assert page == {*PAGE_FILES, "package.json", "package-lock.json", ".npmrc"}
    assert not [n for n in names if any(f"/{part}/" in n for part in NOT_SHIPPED)]
    # every subpackage of the source tree (setup.py finds them; a hand-kept list would miss new ones)
    packages = {p.parent.relative_to(REPO).as_posix() for p in (REPO / "mlx_refusal").rglob("__init__.py")}
    assert {p for p in packages if f"{p}/__init__.py" not in names} == set()
    assert "cli.py" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "mlx-refusal = cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    # the wheel compiled the sgemv forward itself (the copy it was built from has no .so)
    assert bool([n for n in names if n.startswith("mlx_refusal/_gemv_forward.")
                 and n.endswith(".so")]) == sys.platform.startswith("linux")


def test_an_installed_wheel_reads_its_own_prompts_and_page(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, text=True)
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = ("import json, mlx_refusal; from mlx_refusal.prompts import BUNDLED_DIR, bundled, capability_texts; "
             "from mlx_refusal.serve import PAGE_DIR, is_installed_copy; from mlx_refusal import backend; "
             "print(json.dumps({'package': mlx_refusal.__file__, 'prompts': str(BUNDLED_DIR), 'page': str(PAGE_DIR), "
             "'harmful': len(bundled('harmful')), 'test': len(bundled('harmless', 'test')), "
             "'paragraphs': len(capability_texts()), 'index': (PAGE_DIR / 'index.html').is_file(), "
             "'installed': is_installed_copy(PAGE_DIR), 'blas': backend.blas_status()}))")
    out = json.loads(subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, check=True,
                                    capture_output=True, text=True).stdout)
    from mlx_refusal.prompts import bundled, capability_texts

    site = target.resolve()
    assert Path(out["package"]).resolve().parent == site / "mlx_refusal"  # not the checkout
    assert Path(out["prompts"]).resolve() == site / "mlx_refusal" / "data" / "prompts"
    assert Path(out["page"]).resolve() == site / "mlx_refusal" / "data" / "export"
    assert (out["harmful"], out["test"], out["paragraphs"]) == (
        len(bundled("harmful")), len(bundled("harmless", "test")), len(capability_texts()))
    assert out["index"]
    if sys.platform.startswith("linux"):
        assert "products of 1-3 rows on sgemv" in out["blas"], out["blas"]
    assert out["installed"]  # `serve` installs the page's runtime into a cached copy, not into the package
    script = subprocess.run([str(target / "bin" / "mlx-refusal"), "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert script.returncode == 0, script.stderr
    assert "Usage: mlx-refusal" in script.stdout and "steer" in script.stdout
