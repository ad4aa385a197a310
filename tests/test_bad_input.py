"""The bad-input matrix: every case exits with status 2 and one `error:` line that names the
problem and the fix, with no traceback and nothing written, before any model is loaded.

Most cases run in-process with click's CliRunner (the same code path as a user's shell, minus
~3 s of imports); the cases whose exit status or traceback must be seen from outside (serve, a
NaN alpha) run `python cli.py` in a real subprocess.
"""
import mlx_refusal  # noqa: F401  (fast BLAS before mlx.core)

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import cli

REPO = Path(__file__).resolve().parent.parent
NUM_LAYERS = 4  # the tiny fixtures'


@pytest.fixture(scope="module")
def inputs(tiny_qwen2, tmp_path_factory):
    """Bad input files, made once, outside the folder each case must leave untouched."""
    from mlx_refusal.directions import Directions, save_directions

    root = tmp_path_factory.mktemp("bad_inputs")
    files = {"model": tiny_qwen2}

    def put(name, data):
        path = root / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
        files[name] = path

    put("empty.txt", b"")
    put("blank.txt", "   \n\t\n  \n")
    put("nul.txt", "How do I bake bread?\nWhat is\x00 this?\n")
    put("huge.txt", "How do I bake bread?\n" + "a" * 10_000_000 + "\n")
    put("latin1.txt", "Caf\xe9 au lait?\n".encode("latin-1"))
    put("object.json", json.dumps({"prompt": "one prompt, not a list"}))
    put("nocolumn.csv", "text,category\nHow do I bake bread?,food\n")
    put("same.txt", "How do I bake bread?\nName a colour.\n")
    put("long.txt", " ".join(["word"] * 3000) + "\n")  # > the fixture's 2048-token context
    put("prompts.pdf", "%PDF-1.4\n")
    put("a_file.txt", "I am a file, not a folder\n")
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("someone else's work")
    files["foreign"] = foreign
    (root / "no_model").mkdir()
    files["no_model"] = root / "no_model"
    (root / "web").mkdir()
    files["web"] = root / "web"
    other = np.ones((NUM_LAYERS + 1, 64), np.float32) / 8.0
    meta = {"model": {"spec": "some-other-model", "fingerprint": "0" * 64}}
    files["other_dirs"] = save_directions(Directions(other, other, 0 * other, np.ones(NUM_LAYERS + 1, np.float32),
                                                     [], meta), root / "other_dirs")
    files["readonly"] = _read_only_folder(root / "readonly")
    yield files
    if files["readonly"] is not None and os.path.ismount(files["readonly"]):
        subprocess.run(["umount", str(files["readonly"])], check=False)


def _read_only_folder(path: Path) -> Path | None:
    """A folder nobody can write to: a read-only tmpfs as root (root ignores mode bits), else mode 0555."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        return path
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True)
    return path if done.returncode == 0 else None


@pytest.fixture(scope="module")
def busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    yield s.getsockname()[1]
    s.close()


def m(f):
    return ["--model", str(f["model"])]


# id: (argv builder, words the error must contain, the path that must not appear)
CASES = {
    "alpha NaN": (lambda f: ["steer", *m(f), "--alpha", "nan"], "--alpha nan is not a finite number"),
    "alpha Inf": (lambda f: ["steer", *m(f), "--alpha", "inf"], "--alpha inf is not a finite number"),
    "alpha negative": (lambda f: ["steer", *m(f), "--alpha", "-2"], "--alpha -2 must be positive"),
    "alpha-multiple absurd": (lambda f: ["steer", *m(f), "--alpha-multiple", "1e9"], "absurdly large"),
    "alpha and alpha-multiple": (lambda f: ["steer", *m(f), "--alpha", "1", "--alpha-multiple", "1"], "were both given"),
    "scale NaN": (lambda f: ["project", *m(f), "--scale", "nan"], "--scale nan is not a finite number"),
    "scale -Inf": (lambda f: ["project", *m(f), "--scale", "-inf"], "--scale -inf is not a finite number"),
    "scale absurd": (lambda f: ["project", *m(f), "--scale", "1e6"], "--scale 1e+06 is absurdly large"),
    "layer -1": (lambda f: ["steer", *m(f), "--layer", "-1"], "--layer -1 is out of range; this model has layers 0..3"),
    "layer = num_layers": (lambda f: ["steer", *m(f), "--layer", "4"], "--layer 4 is the final residual"),
    "ablate layer on the final-residual row": (lambda f: ["ablate", *m(f), "--layer", "4"], "is the final residual"),
    "export layer out of range": (lambda f: ["export-onnx", *m(f), "--out", "web", "--layer", "9"],
                                  "--layer 9 is out of range; this model has layers 0..3 (4 = the final residual)"),
    "--layers 5:3": (lambda f: ["ablate", *m(f), "--layers", "5:3"], "empty range (the end must be above the start)"),
    "--layers past the end": (lambda f: ["ablate", *m(f), "--layers", "1:99"], "'1:99' is out of range"),
    "--search with --layer": (lambda f: ["ablate", *m(f), "--search", "4", "--layer", "1"],
                              "--search chooses the direction"),
    "empty prompt file": (lambda f: ["directions", *m(f), "--harmful", f["empty.txt"]], "contains no prompts"),
    "whitespace-only prompt file": (lambda f: ["directions", *m(f), "--harmful", f["blank.txt"]], "contains no prompts"),
    "NUL in a prompt file": (lambda f: ["directions", *m(f), "--harmful", f["nul.txt"]], "contains a NUL byte (line 2)"),
    "10 MB line": (lambda f: ["directions", *m(f), "--harmful", f["huge.txt"]], "prompt 2 is 10,000,000 characters"),
    "non-UTF-8 prompt file": (lambda f: ["directions", *m(f), "--harmful", f["latin1.txt"]], "is not UTF-8 text"),
    "JSON of the wrong shape": (lambda f: ["directions", *m(f), "--harmful", f["object.json"]], "expected a JSON list"),
    "CSV without the column": (lambda f: ["directions", *m(f), "--harmless", f["nocolumn.csv"]], "no column 'prompt'"),
    "missing prompt file": (lambda f: ["directions", *m(f), "--harmful", "nope.txt"], "neither a bundled set"),
    "unsupported prompt file": (lambda f: ["directions", *m(f), "--harmful", f["prompts.pdf"]], "unsupported prompt file"),
    "same file for both sets": (lambda f: ["directions", *m(f), "--harmful", f["same.txt"], "--harmless", f["same.txt"]],
                                "are the same prompts"),
    "prompt longer than the context": (lambda f: ["steer", *m(f), "--harmful", f["long.txt"]],
                                       "longer than the model's context of 2,048"),
    "directions of another model": (lambda f: ["steer", *m(f), "--directions", f["other_dirs"]],
                                    "was computed on some-other-model"),
    "--out a file": (lambda f: ["steer", *m(f), "--out", f["a_file.txt"]], "is a file, not a folder"),
    "--out a foreign folder with --force": (lambda f: ["ablate", *m(f), "--out", f["foreign"], "--force"],
                                            "it is not a model folder"),
    "--out a read-only folder": (lambda f: ["steer", *m(f), "--out", f["readonly"] / "steered"], "is not writable"),
    "import-gguf --out a file": (lambda f: ["import-gguf", f["same.txt"], "--out", f["a_file.txt"]], "is a file"),
    "export-onnx of a folder without a model": (lambda f: ["export-onnx", "--model", f["no_model"], "--out", "web"],
                                                "not an mlx_lm model (no config.json)"),
    "export-onnx unknown --dtype": (lambda f: ["export-onnx", *m(f), "--out", "web", "--dtype", "fp64"],
                                    "unknown dtype fp64"),
    "export-onnx unknown --share-embedding": (
        lambda f: ["export-onnx", *m(f), "--out", "web", "--share-embedding", "sometimes"],
        "Invalid value for '--share-embedding'"),
    "batch size 0": (lambda f: ["steer", *m(f), "--batch-size", "0"], "Invalid value for '--batch-size'"),
    "info on a missing model": (lambda f: ["info", "--model", "./no/such/model"], "no such file or folder"),
}

# Seen from outside: a real interpreter, its exit status and its stderr.
SUBPROCESS_CASES = {
    "serve a missing bundle": (lambda f: ["serve", "missing_bundle"], "is not a folder"),
    "serve on a busy port": (lambda f: ["serve", f["web"], "--port", str(f["port"])], "cannot listen on 127.0.0.1"),
    "alpha NaN, from outside": (lambda f: ["steer", *m(f), "--alpha", "nan", "--layer", "1"], "not a finite number"),
}


def _snapshot(folder: Path) -> set:
    return {(str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*")}


def _check(status: int, stderr: str, stdout: str, expected: str, work: Path, before: set, inputs: dict):
    lines = [line for line in (stdout + stderr).splitlines() if line.strip()]
    assert "Traceback" not in stdout + stderr
    assert status == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert expected in lines[0], lines[0]
    assert " choose " in lines[0] or "; " in lines[0] or "(see " in lines[0], f"no fix named: {lines[0]}"
    assert _snapshot(work) == before, "something was written"
    assert sorted(p.name for p in inputs["foreign"].iterdir()) == ["thesis.tex"]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, inputs, tmp_path, monkeypatch):
    build, expected = CASES[case]
    if "read-only" in case and inputs["readonly"] is None:
        pytest.skip("no read-only folder here: root and tmpfs cannot be mounted")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLX_REFUSAL_CACHE", str(tmp_path / "cache"))
    before = _snapshot(work)
    result = CliRunner().invoke(cli.main, [str(a) for a in build(inputs)])
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exc_info
    _check(result.exit_code, result.stderr, result.stdout, expected, work, before, inputs)


@pytest.mark.parametrize("case", list(SUBPROCESS_CASES))
def test_bad_input_in_a_real_process(case, inputs, busy_port, tmp_path):
    build, expected = SUBPROCESS_CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    before = _snapshot(work)
    env = dict(os.environ, MLX_REFUSAL_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), *map(str, build({**inputs, "port": busy_port}))],
                          cwd=work, env=env, capture_output=True, text=True, timeout=120)
    _check(proc.returncode, proc.stderr, proc.stdout, expected, work, before, inputs)


def test_the_matrix_is_at_least_30_cases():
    assert len(CASES) + len(SUBPROCESS_CASES) >= 30


def test_every_layer_index_is_checked_by_one_function_with_two_limits(tiny_qwen2):
    """Editing a layer allows 0..L-1; reading or adding to a residual also allows L, the final
    residual. Every site says it the same way."""
    import mlx_lm

    from mlx_refusal import edit, interventions, validate
    from mlx_refusal.errors import UserError
    from mlx_refusal.onnx.bundle import _activations_layer
    from mlx_refusal.onnx.source import read_model
    from mlx_refusal.directions import Directions

    L = NUM_LAYERS
    for n in (1, L, 24):
        for i in range(-2, n + 3):
            for final in (False, True):
                fits = 0 <= i < n or (final and i == n)
                try:
                    validate.layer("--layer", i, n, final_residual=final)
                    assert fits
                except UserError as exc:
                    assert not fits
                    assert str(exc).startswith(f"--layer {i} is ")
    model, _ = mlx_lm.load(str(tiny_qwen2))
    hidden = model.args.hidden_size
    rows = np.ones((L + 1, hidden), np.float32)
    d = Directions(rows, rows, rows, np.ones(L + 1, np.float32))
    beyond = f"layer {L + 1} is out of range; this model has layers 0..{L - 1} ({L} = the final residual)"
    final = f"layer {L} is the final residual (after the last layer), not a layer one can edit"
    residual_sites = [lambda i: d.direction(i), lambda i: edit.add_steering_bias(model, i, rows[0]),
                      lambda i: interventions.adding_at(model, i, rows[0]).__enter__()]
    for site in residual_sites:
        with pytest.raises(UserError) as exc:
            site(L + 1)
        assert str(exc.value) == beyond
    layer_sites = [lambda i: edit.ablate(model, rows[0], layers=[0, i]),
                   lambda i: interventions.hooked_layers(model, before={i: lambda x: x}).__enter__()]
    for site in layer_sites:
        with pytest.raises(UserError, match="^" + re.escape(final)):
            site(L)
    with pytest.raises(UserError, match=rf"^--layer {L + 1} is out of range.*\({L} = the final residual\)$"):
        _activations_layer(read_model(tiny_qwen2), L + 1)
    assert _activations_layer(read_model(tiny_qwen2), L) == L


def test_help_and_option_errors_answer_without_the_model_runtime():
    """`--help` and a malformed option are answered before mlx_lm's generator or transformers is
    imported: those imports were 2.1 of the 2.5 s a `cli.py --help` took."""
    code = (
        "import contextlib, io, runpy, sys\n"
        "for argv in (['--help'], ['steer', '--help'], ['ablate', '--max-tokens', 'many']):\n"
        "    sys.argv = ['cli.py', *argv]\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()), "
        "contextlib.redirect_stderr(io.StringIO()):\n"
        "        runpy.run_path('cli.py', run_name='__main__')\n"
        "print(' '.join(m for m in ('transformers', 'mlx_lm.generate', 'mlx_lm.tokenizer_utils') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "", f"imported for --help: {proc.stdout.strip()}"
