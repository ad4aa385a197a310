"""mlx_lm's package __init__ (which imports transformers, 1.2 s) runs only when a name of the
package itself is asked for: building a model and capturing need none (mlx_lm_package.py)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_a_model_builds_and_runs_without_transformers(tiny_qwen2):
    out = _run(f"""
import sys
import mlx_refusal
import mlx.core as mx
from mlx_refusal import api, batching, capture, loading
model = loading.build_model({str(tiny_qwen2)!r})
print(model(mx.array([[1, 2, 3]])).shape)
late = sorted(m for m in sys.modules if m.startswith("transformers") or m in ("mlx_lm.convert", "mlx_lm.utils", "mlx_lm.generate"))
print("late:", late)
""")
    assert "late: []" in out and "(1, 3, " in out


def test_a_name_of_the_package_runs_its_init():
    out = _run("""
import sys
import mlx_refusal
import mlx_lm
from mlx_lm import generate, load
from mlx_lm.generate import BatchGenerator
import importlib.metadata
assert mlx_lm.__version__ == importlib.metadata.version("mlx-lm")
assert callable(generate) and callable(load) and "mlx_lm.convert" in sys.modules
assert "__getattr__" not in vars(mlx_lm)  # the __init__ ran once; a missing name is an AttributeError again
try:
    mlx_lm.no_such_name
except AttributeError:
    print("ok")
""")
    assert out.strip() == "ok"


@pytest.mark.parametrize("first", ["import mlx_lm.models.cache", "from mlx_lm.generate import BatchGenerator"])
def test_a_submodule_first_then_the_package(first):
    # a submodule imported before any name of the package: the package's names still arrive whole
    out = _run(f"""
import mlx_refusal
{first}
import mlx_lm
print(sorted(n for n in ("batch_generate", "convert", "generate", "load", "stream_generate") if callable(getattr(mlx_lm, n))))
""")
    assert out.strip() == "['batch_generate', 'convert', 'generate', 'load', 'stream_generate']"


def test_mlx_lm_imported_first_is_left_alone():
    out = _run("""
import mlx_lm
before = mlx_lm
import mlx_refusal
import sys
assert sys.modules["mlx_lm"] is before and "__getattr__" not in vars(before)
print(before.load.__module__)
""")
    assert out.strip() == "mlx_lm.utils"
