"""Choosing OpenBLAS's kernels (backend._choose_kernels, _blas_probe.py): the probe tells right
products from wrong ones, the verdict takes only right and clearly faster kernel sets, it is
cached per library and CPU, and a kernel set the user chose is never overridden."""
from __future__ import annotations

import ctypes
import json
import os
import random
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mlx_refusal  # noqa: F401  (BLAS before mlx.core)
from mlx_refusal import _blas_probe as probe
from mlx_refusal import backend

linux_blas = pytest.mark.skipif(backend._loaded_blas is None, reason=f"no OpenBLAS here: {backend.blas_status()}")


def _real():
    return probe.bind(ctypes.CDLL(backend._loaded_blas))


@linux_blas
@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 12), n=st.integers(1, 40), k=st.integers(1, 300), b_transposed=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_the_probe_passes_the_real_sgemm_at_any_shape(m, n, k, b_transposed, seed):
    sgemm, _ = _real()
    assert probe.sgemm_right(sgemm, m, n, k, b_transposed, random.Random(seed))


@linux_blas
@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 8), n=st.integers(4, 30), k=st.integers(8, 200), seed=st.integers(0, 2**31 - 1),
       wrong=st.sampled_from(["one element", "dropped term", "half precision"]))
def test_the_probe_fails_an_sgemm_that_is_wrong_anywhere(m, n, k, seed, wrong):
    # n >= 4: a lost term slips under the bound only where it is tiny in every element at once
    real, _ = _real()
    rng = random.Random(seed)
    spot = rng.randrange(m * n)

    @ctypes.CFUNCTYPE(None, *real.argtypes)
    def broken(order, ta, tb, m_, n_, k_, alpha, a, lda, b, ldb, beta, c, ldc):
        # a kernel bug: one element off, the last term of the sum lost, or float16 accuracy
        real(order, ta, tb, m_, n_, k_ - (wrong == "dropped term"), alpha, a, lda, b, ldb, beta, c, ldc)
        if wrong == "one element":
            c[spot] += 0.01 * (1 + abs(c[spot]))
        elif wrong == "half precision":
            for i in range(m_ * n_):
                c[i] += 1e-3 * (1 + abs(c[i]))

    broken.argtypes = real.argtypes
    assert not probe.sgemm_right(broken, m, n, k, True, random.Random(seed))


@linux_blas
def test_the_probe_of_a_library_names_its_kernels_and_measures_sgemm():
    result = backend._probe(backend._loaded_blas, os.environ.get(backend.ENV_CORETYPE))
    assert result["right"] is True and result["gflops"] > 1
    if os.environ.get(backend.ENV_CORETYPE):  # the kernel set it was given, by name
        assert result["corename"].lower() == os.environ[backend.ENV_CORETYPE].lower()


def test_a_probe_that_cannot_run_counts_as_wrong(tmp_path):
    assert backend._probe(str(tmp_path / "no-such-library.so"), None) == {"right": False}


@pytest.mark.parametrize("own, tried, want", [
    ({"right": True, "gflops": 62}, {"SkylakeX": {"right": True, "gflops": 301}, "Haswell": {"right": True, "gflops": 160}},
     "SkylakeX"),
    # AVX-512 slower than AVX2 on this CPU: the fastest right set, whatever its rank in KERNEL_SETS
    ({"right": True, "gflops": 62}, {"SkylakeX": {"right": True, "gflops": 120}, "Haswell": {"right": True, "gflops": 160}},
     "Haswell"),
    # the library's own pick is as good: kept (1.2x is within the noise of a busy machine)
    ({"right": True, "gflops": 250}, {"SkylakeX": {"right": True, "gflops": 300}}, None),
    ({"right": True, "gflops": 240}, {"SkylakeX": {"right": True, "gflops": 300}}, "SkylakeX"),
    # a set with wrong answers is never taken, however fast
    ({"right": True, "gflops": 62}, {"SkylakeX": {"right": False, "gflops": 900}}, None),
    # the library's own pick is wrong: any right set beats it
    ({"right": False, "gflops": 300}, {"Haswell": {"right": True, "gflops": 100}}, "Haswell"),
    ({"right": False}, {"Haswell": {"right": False}}, None),
    ({"right": True, "gflops": 62}, {}, None),
])
def test_the_verdict_takes_only_right_and_clearly_faster_kernels(own, tried, want):
    assert backend.kernel_verdict(own, tried) == want


@pytest.fixture
def fake_cpu(monkeypatch, tmp_path):
    """A fresh cache, no OPENBLAS_CORETYPE, an AVX-512 CPU and a probe that counts its calls and
    answers like OpenBLAS 0.3.21 on an Emerald Rapids Xeon."""
    monkeypatch.setenv("MLX_REFUSAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(backend.ENV_CORETYPE, raising=False)
    monkeypatch.delenv(backend.ENV_NO_KERNEL_PROBE, raising=False)
    monkeypatch.setattr(backend, "_cpu", lambda: ("GenuineIntel|6|207|Xeon|2", {"avx2", "fma", *backend.KERNEL_SETS[0][1]}))
    monkeypatch.setattr(backend, "_kernel_choice", None)
    monkeypatch.setattr(backend, "_kernel_message", None)
    calls = []
    speeds = {None: ("Prescott", 62.0), "SkylakeX": ("SkylakeX", 301.0), "Haswell": ("Haswell", 160.0)}

    def fake_probe(path, coretype):
        calls.append(coretype)
        name, gflops = speeds[coretype]
        return {"corename": name, "right": True, "gflops": gflops}

    monkeypatch.setattr(backend, "_probe", fake_probe)
    return calls


def test_a_generic_kernel_pick_is_replaced_and_the_verdict_cached(fake_cpu, tmp_path):
    lib = tmp_path / "libopenblas.so.0"
    lib.write_bytes(b"stand-in: only its path, size and time are read")
    backend._choose_kernels(str(lib))
    assert os.environ[backend.ENV_CORETYPE] == "SkylakeX"  # so child processes inherit it
    assert sorted(fake_cpu, key=str) == sorted([None, "SkylakeX", "Haswell"], key=str)
    assert "SkylakeX kernels: OpenBLAS's own pick, Prescott, ran sgemm at 62 GFLOP/s, SkylakeX at 301" in \
        backend._kernel_message
    [memo] = (tmp_path / "cache" / "blas").glob("kernels-*.json")
    assert json.loads(memo.read_text())["choice"] == "SkylakeX"

    os.environ.pop(backend.ENV_CORETYPE)
    backend._choose_kernels(str(lib))  # the next process: read from the cache, nothing measured
    assert len(fake_cpu) == 3 and os.environ[backend.ENV_CORETYPE] == "SkylakeX"

    os.environ.pop(backend.ENV_CORETYPE)
    lib.write_bytes(b"another build of the library, so another verdict")
    backend._choose_kernels(str(lib))
    assert len(fake_cpu) == 6


@pytest.mark.parametrize("damage", ["not json", '{"choice": "SkylakeX"}', '{"choice": "rm -rf", "own": {}, "tried": {}}',
                                    '{"choice": "Haswell", "own": {}, "tried": {"Haswell": {}}}', "[]"])
def test_a_damaged_verdict_is_measured_again(fake_cpu, tmp_path, damage):
    lib = tmp_path / "libopenblas.so.0"
    lib.write_bytes(b"x")
    backend._choose_kernels(str(lib))
    [memo] = (tmp_path / "cache" / "blas").glob("kernels-*.json")
    memo.write_text(damage)
    os.environ.pop(backend.ENV_CORETYPE)
    backend._choose_kernels(str(lib))
    assert len(fake_cpu) == 6 and os.environ[backend.ENV_CORETYPE] == "SkylakeX"
    assert json.loads(memo.read_text())["choice"] == "SkylakeX"


def test_the_users_kernel_set_and_the_switch_are_obeyed(fake_cpu, tmp_path, monkeypatch):
    lib = tmp_path / "libopenblas.so.0"
    lib.write_bytes(b"x")
    monkeypatch.setenv(backend.ENV_CORETYPE, "Haswell")
    backend._choose_kernels(str(lib))
    assert os.environ[backend.ENV_CORETYPE] == "Haswell" and fake_cpu == []
    assert backend._kernel_message == f"{backend.ENV_CORETYPE}=Haswell from the environment"
    monkeypatch.delenv(backend.ENV_CORETYPE)
    monkeypatch.setenv(backend.ENV_NO_KERNEL_PROBE, "1")
    backend._choose_kernels(str(lib))
    assert backend.ENV_CORETYPE not in os.environ and fake_cpu == []


def test_a_cpu_without_avx2_is_left_to_openblas(fake_cpu, tmp_path, monkeypatch):
    monkeypatch.setattr(backend, "_cpu", lambda: ("old", {"sse3", "avx"}))
    lib = tmp_path / "libopenblas.so.0"
    lib.write_bytes(b"x")
    backend._choose_kernels(str(lib))
    assert backend.ENV_CORETYPE not in os.environ and fake_cpu == []


def test_stock_env_carries_the_chosen_kernels(monkeypatch):
    monkeypatch.setattr(backend, "_kernel_choice", "SkylakeX")
    env = backend.stock_env()
    if backend.stock_preload():
        assert env == {"LD_PRELOAD": backend.stock_preload(), backend.ENV_CORETYPE: "SkylakeX"}
    monkeypatch.setattr(backend, "_kernel_choice", None)
    assert backend.ENV_CORETYPE not in backend.stock_env()


@linux_blas
def test_a_fresh_process_on_this_machine_loads_the_kernels_it_chose(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != backend.ENV_CORETYPE}
    env["MLX_REFUSAL_CACHE"] = str(tmp_path)
    code = ("import os, ctypes, mlx_refusal; from mlx_refusal import backend; "
            "lib = ctypes.CDLL(backend._loaded_blas); lib.openblas_get_corename.restype = ctypes.c_char_p; "
            "print(backend._kernel_choice, lib.openblas_get_corename().decode(), os.environ.get('OPENBLAS_CORETYPE'))")
    choice, loaded, exported = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                              check=True).stdout.split()
    if choice != "None":
        assert loaded.lower() == choice.lower() and exported == choice
    else:
        assert exported == "None"
