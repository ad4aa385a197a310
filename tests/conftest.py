import mlx_refusal  # noqa: F401  (loads the fast BLAS before anything imports mlx.core)

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fixtures import make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"), arch="qwen2")


@pytest.fixture(scope="session")
def tiny_qwen2_tied(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_qwen2_tied"), arch="qwen2", tie=True)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama"), arch="llama", seed=1)


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_qwen3"), arch="qwen3", seed=2)


@pytest.fixture(scope="session")
def tiny_phi3(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_phi3"), arch="phi3", seed=3)


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory) -> Path:
    # hidden 48: sqrt(48) is not a bfloat16, so the embedding scale's rounding matters
    return make_tiny_model(tmp_path_factory.mktemp("tiny_gemma3"), arch="gemma3_text", hidden=48, tie=True, seed=4)


REPO = Path(__file__).resolve().parent.parent
PRESET = "qwen2.5-coder-0.5b"


@pytest.fixture(scope="session")
def reference():
    """The reference model (fetched and converted once, then cached): (model, tokenizer, info)."""
    from mlx_refusal.loading import load

    return load(PRESET)


@pytest.fixture(scope="session")
def fixed_steer(tmp_path_factory) -> Path:
    """The default model steered at layer 14, 0.5x the residual norm, no report: what the real
    tier's stock-mlx_lm and browser tests both run (made once)."""
    out = tmp_path_factory.mktemp("fixed_steer") / "refusallm"
    run_cli("steer", "--layer", 14, "--alpha-multiple", 0.5, "--eval-limit", 0, "--out", out)
    return out


def run_cli(*args: str, timeout: int = 3000) -> str:
    """Run `python cli.py ARGS` in a fresh interpreter (as a user would) and return its stdout;
    fail the test with its stderr when it exits non-zero."""
    import subprocess

    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"cli.py {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc.stdout


def stock_generate(model_dir, prompt: str, max_tokens: int = 40) -> str:
    """Answer with *stock* `python -m mlx_lm generate --model DIR` (no mlx_refusal code involved;
    the BLAS preloaded only so the CPU run is fast, as `info` tells users to)."""
    import os
    import subprocess

    from mlx_refusal import backend

    env = {**os.environ, **backend.stock_env()}
    proc = subprocess.run([sys.executable, "-m", "mlx_lm", "generate", "--model", str(model_dir), "--prompt", prompt,
                           "--max-tokens", str(max_tokens), "--temp", "0"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split("==========")[1].strip()
