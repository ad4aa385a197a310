"""Run as a script by backend.py, in a child process: which kernels an OpenBLAS picks (under the
OPENBLAS_CORETYPE the child was given, if any), whether its sgemm and sgemv give right answers,
and how fast its sgemm is. Prints one JSON line.

A child process, because OpenBLAS reads OPENBLAS_CORETYPE once, when it is loaded: each kernel
set is measured in a library loaded afresh. Standard library only, and never `import mlx_refusal`,
whose import loads a BLAS.

Usage: python _blas_probe.py LIBRARY
"""
from __future__ import annotations

import ctypes
import json
import math
import random
import sys
import time

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112
FLOATS = ctypes.POINTER(ctypes.c_float)

# Shapes that reach the kernels' edges: sizes off their register blocks, a depth past one
# panel, one row, and the transposed weights MLX passes for x @ W.T.
CHECKS = [(1, 37, 65, False), (3, 70, 33, True), (17, 29, 300, True), (9, 20, 520, False), (40, 33, 64, True)]
TIMED = 512  # a cube: ~0.3 GFLOP, milliseconds at any speed OpenBLAS reaches


def _floats(values):
    return (ctypes.c_float * len(values))(*values)


def bind(lib):
    """cblas_sgemm and cblas_sgemv of `lib`, typed."""
    sgemm, sgemv = lib.cblas_sgemm, lib.cblas_sgemv
    sgemm.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, FLOATS, ctypes.c_int, FLOATS, ctypes.c_int,
                                           ctypes.c_float, FLOATS, ctypes.c_int]
    sgemv.argtypes = [ctypes.c_int] * 4 + [ctypes.c_float, FLOATS, ctypes.c_int, FLOATS, ctypes.c_int,
                                           ctypes.c_float, FLOATS, ctypes.c_int]
    return sgemm, sgemv


def _close(got, a_rows, b_cols) -> bool:
    """Each element within the error bound of any float32 summation order, (k + 1) u sum |a b|
    (u = 2^-24), of the exact dot product: a wrong kernel misses by the size of the terms."""
    for i, row in enumerate(a_rows):
        for j, col in enumerate(b_cols):
            terms = [x * y for x, y in zip(row, col)]
            bound = (len(terms) + 1) * 2.0 ** -24 * math.fsum(map(abs, terms))
            if not abs(got[i * len(b_cols) + j] - math.fsum(terms)) <= bound:
                return False
    return True


def sgemm_right(sgemm, m: int, n: int, k: int, b_transposed: bool, rng: random.Random) -> bool:
    """C[m, n] = A[m, k] @ B, B stored [n, k] (transposed) or [k, n], row-major, against float64."""
    a = [rng.uniform(-1, 1) for _ in range(m * k)]
    b = [rng.uniform(-1, 1) for _ in range(n * k)]
    c = _floats([0.0] * (m * n))
    a_f, b_f = _floats(a), _floats(b)
    sgemm(ROW_MAJOR, NO_TRANS, TRANS if b_transposed else NO_TRANS, m, n, k, 1.0, a_f, k, b_f,
          k if b_transposed else n, 0.0, c, n)
    a_rows = [list(a_f[i * k:(i + 1) * k]) for i in range(m)]  # the float32 values the BLAS saw
    b_cols = ([list(b_f[j * k:(j + 1) * k]) for j in range(n)] if b_transposed
              else [[b_f[p * n + j] for p in range(k)] for j in range(n)])
    return _close(c, a_rows, b_cols)


def sgemv_right(sgemv, n: int, k: int, rng: random.Random) -> bool:
    """y[n] = W[n, k] @ x[k], row-major, against float64."""
    w_f = _floats([rng.uniform(-1, 1) for _ in range(n * k)])
    x_f = _floats([rng.uniform(-1, 1) for _ in range(k)])
    y = _floats([0.0] * n)
    sgemv(ROW_MAJOR, NO_TRANS, n, k, 1.0, w_f, k, x_f, 1, 0.0, y, 1)
    return _close(y, [list(x_f)], [list(w_f[j * k:(j + 1) * k]) for j in range(n)])


def sgemm_gflops(sgemm, n: int = TIMED, repeats: int = 5) -> float:
    a, b, c = ((ctypes.c_float * (n * n))() for _ in range(3))  # zeros: OpenBLAS takes no shortcut for them
    best = math.inf
    for _ in range(repeats + 1):  # the first call starts OpenBLAS's threads
        t0 = time.perf_counter()
        sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, n, n, n, 1.0, a, n, b, n, 0.0, c, n)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def probe(path: str) -> dict:
    lib = ctypes.CDLL(path)
    corename = lib.openblas_get_corename
    corename.restype = ctypes.c_char_p
    sgemm, sgemv = bind(lib)
    rng = random.Random(0)
    right = all(sgemm_right(sgemm, *shape, rng) for shape in CHECKS) and sgemv_right(sgemv, 151, 96, rng)
    return {"corename": corename().decode(), "right": right, "gflops": round(sgemm_gflops(sgemm), 2)}


if __name__ == "__main__":
    print(json.dumps(probe(sys.argv[1])))
