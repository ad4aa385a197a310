"""The sgemv forward (`mlx_refusal/_gemv_forward.c`): every product it takes over from sgemm (2-31
rows by transposed weights on its own kernel, other products of 1-3 rows or of one column on sgemv)
gives sgemm's answer, through MLX and through the C entry point's every layout, from several
threads at once and in a forked child."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlx_refusal  # noqa: F401  (BLAS before mlx.core)
import mlx.core as mx
from mlx_refusal import backend

pytestmark = pytest.mark.skipif(backend.gemv_forward_count() is None,
                                reason=f"no sgemv forward here: {backend.blas_status()}")

ROW_MAJOR, COL_MAJOR, NO_TRANS, TRANS = 101, 102, 111, 112
FLOATS = ctypes.POINTER(ctypes.c_float)


def _close(got, want, k):
    # float32 products over k terms of unit-normal numbers
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.sqrt(k) * 4)


def _forwarded() -> int:
    return backend.gemv_forward_count() + (backend.skinny_count() or 0)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 300), k=st.integers(1, 300), rows=st.integers(1, 3), row=st.booleans(),
       w_transposed=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_mlx_few_row_and_one_column_products_are_taken_over_and_match_float64(n, k, rows, row, w_transposed, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k) if w_transposed else (k, n)).astype(np.float32)
    x = rng.standard_normal((rows if row else 1, k)).astype(np.float32)
    x_mx = mx.array(x)
    w_mx = mx.array(w).T if w_transposed else mx.array(w)  # a transposed view: sgemm's trans flag
    w64 = w.T.astype(np.float64) if w_transposed else w.astype(np.float64)
    before = _forwarded()
    if row:  # x[rows, k] @ W[k, n]
        got, want = np.asarray(x_mx @ w_mx), x.astype(np.float64) @ w64
    else:  # W^T[n, k] @ x^T[k, 1]
        got, want = np.asarray(w_mx.T @ x_mx.T), w64.T @ x.astype(np.float64).T
    assert _forwarded() > before
    _close(got, want, k)


needs_kernel = pytest.mark.skipif(backend.skinny_rows() < 2, reason="the own kernel needs AVX-512 or AVX2")
WIDEST = backend.skinny_width()
WIDTHS = [w for w in (512, 256) if w <= WIDEST and backend.skinny_width(w) == w] or [0]
backend.skinny_width(WIDEST)


@pytest.fixture(params=WIDTHS, ids=lambda w: f"{w}-bit")
def width(request):
    """Each vector width the CPU has, taking up to 31 rows."""
    if request.param == 0:
        pytest.skip("the own kernel needs AVX-512 or AVX2")
    rows = backend.skinny_rows()
    backend.skinny_width(request.param)
    backend.skinny_rows(31)
    yield request.param
    backend.skinny_width(WIDEST)
    backend.skinny_rows(rows)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])  # set per test
@given(m=st.integers(2, 31), n=st.integers(2, 300), k=st.integers(1, 2200), seed=st.integers(0, 2**31 - 1))
def test_mlx_products_of_2_to_31_rows_by_transposed_weights_take_the_kernel_and_match_float64(width, m, n, k, seed):
    # k past 1024 crosses a depth chunk; n and m off multiples of 4 take the narrow tiles (MLX
    # computes one column by one depth without BLAS)
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((n, k)).astype(np.float32)
    before, sgemv_before = backend.skinny_count(), backend.gemv_forward_count()
    got = np.asarray(mx.array(x) @ mx.array(w).T)
    assert backend.skinny_count() == before + 1 and backend.gemv_forward_count() == sgemv_before
    _close(got, x.astype(np.float64) @ w.T.astype(np.float64), k)


@needs_kernel
def test_each_width_brings_its_own_row_limit():
    # what a CPU with no wider vectors runs: AVX2's narrower tiles pay off up to fewer rows
    limits = {}
    for bits in (512, 256):
        if backend.skinny_width(bits) == bits:
            backend.skinny_rows(5)
            backend.skinny_width(bits)
            limits[bits] = backend.skinny_rows()
    backend.skinny_width(WIDEST)
    assert backend.skinny_rows() == limits[WIDEST] > 5
    assert all(rows > 5 for rows in limits.values())
    if len(limits) == 2:
        assert limits[512] > limits[256]
    assert backend.skinny_width(128) == WIDEST and backend.skinny_rows() == limits[WIDEST]  # no such width


@needs_kernel
def test_one_row_and_32_rows_or_more_stay_off_the_kernel():
    w = mx.random.normal((64, 96))
    before = backend.skinny_count()
    for m in (1, 32, 40):
        x = mx.random.normal((m, 96))
        _close(np.asarray(x @ w.T), np.asarray(x, np.float64) @ np.asarray(w, np.float64).T, 96)
    assert backend.skinny_count() == before


def test_wider_products_stay_on_sgemm():
    x, w = mx.random.normal((4, 64)), mx.random.normal((64, 5))
    before = backend.gemv_forward_count()
    got = np.asarray(x @ w)
    assert backend.gemv_forward_count() == before
    _close(got, np.asarray(x, np.float64) @ np.asarray(w, np.float64), 64)


KERNEL_ROWS = backend.skinny_rows()  # the default


def _kernel_switch(on: bool):
    backend.skinny_rows(KERNEL_ROWS if on else 0)


@pytest.mark.parametrize("rows, count, switch", [(1, backend.gemv_forward_count, backend.gemv_forward_enable),
                                                 (8, backend.skinny_count, _kernel_switch)], ids=["sgemv", "kernel"])
def test_switched_off_each_path_gives_the_same_product_through_sgemm(rows, count, switch):
    if count is backend.skinny_count and KERNEL_ROWS < 2:
        pytest.skip("the own kernel needs AVX-512")
    x, w = mx.random.normal((rows, 896)), mx.random.normal((4864, 896))
    forwarded = np.asarray(x @ w.T)
    switch(False)
    try:
        before = count()
        plain = np.asarray(x @ w.T)
        assert count() == before
    finally:
        switch(True)
    np.asarray(x @ w.T)
    assert count() > before  # back on
    _close(forwarded, plain, 896)


def _sgemm():
    fn = backend._gemv_forward.cblas_sgemm
    fn.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, FLOATS, ctypes.c_int, FLOATS, ctypes.c_int, ctypes.c_float,
                                        FLOATS, ctypes.c_int]
    return fn


# every layout and branch as its own case, so none is left to the draw
@pytest.mark.parametrize("order", [ROW_MAJOR, COL_MAJOR])
@pytest.mark.parametrize("trans_a", [NO_TRANS, TRANS])
@pytest.mark.parametrize("trans_b", [NO_TRANS, TRANS])
@pytest.mark.parametrize("shape", ["row", "rows", "column", "both", "wide"])
@settings(max_examples=12, deadline=None)
@given(size=st.tuples(st.integers(2, 40), st.integers(1, 40)), pad=st.integers(0, 3),
       alpha=st.sampled_from([1.0, -0.5]), beta=st.sampled_from([0.0, 1.0, 2.0]), seed=st.integers(0, 2**31 - 1))
def test_the_c_entry_point_computes_alpha_ab_plus_beta_c_in_every_layout(order, trans_a, trans_b, shape, size, pad,
                                                                          alpha, beta, seed):
    other, k = size
    m, n = {"row": (1, other), "rows": (2 + other % 2, other), "column": (other, 1), "both": (1, 1),
            "wide": (other + 3, other + 1)}[shape]
    rng = np.random.default_rng(seed)
    op_a, op_b = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    c0 = rng.standard_normal((m, n))
    # Store each operand as BLAS sees it: op(X) or its transpose, row- or column-major, with a
    # leading dimension `pad` wider than needed (strided rows, the inc_x != 1 cases).
    def stored(op, trans):
        logical = op.T if trans == TRANS else op  # the matrix whose layout the flag describes
        rows, cols = logical.shape if order == ROW_MAJOR else logical.shape[::-1]
        buf = np.full((rows, cols + pad), np.nan, np.float32)
        buf[:, :cols] = logical if order == ROW_MAJOR else logical.T
        return buf, cols + pad
    a, lda = stored(op_a, trans_a)
    b, ldb = stored(op_b, trans_b)
    c, ldc = stored(c0, NO_TRANS)
    if beta == 0.0:
        c[:] = np.nan  # beta = 0 must ignore C's old contents, NaNs included
    _sgemm()(order, trans_a, trans_b, m, n, k, alpha, a.ctypes.data_as(FLOATS), lda, b.ctypes.data_as(FLOATS), ldb,
             beta, c.ctypes.data_as(FLOATS), ldc)
    got = c[:, :ldc - pad] if order == ROW_MAJOR else c[:, :ldc - pad].T
    want = alpha * op_a @ op_b + (beta * c0 if beta else 0)
    _close(got, want, k)
    if pad:  # nothing written past each row
        assert np.isnan(c[:, ldc - pad:]).all()


def test_blas_status_names_the_forward():
    assert sys.platform.startswith("linux")
    assert "products of 1-3 rows on sgemv" in backend.blas_status()
    rows = backend.skinny_rows()
    assert (f"products of 2-{rows} rows on its own kernel" in backend.blas_status()) == (rows >= 2)


def _product(m, n, k, seed):
    """x[m, k] @ W[n, k].T through the C entry point, and float64's answer."""
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((n, k)).astype(np.float32)
    c = np.full((m, n), np.nan, np.float32)
    _sgemm()(ROW_MAJOR, NO_TRANS, TRANS, m, n, k, 1.0, x.ctypes.data_as(FLOATS), k, w.ctypes.data_as(FLOATS), k,
             0.0, c.ctypes.data_as(FLOATS), n)
    return c, x.astype(np.float64) @ w.T.astype(np.float64)


def test_the_kernel_gives_the_right_products_to_several_threads_at_once(width):
    # ctypes lets go of the GIL: the calls overlap, and all but one run outside the thread pool
    from concurrent.futures import ThreadPoolExecutor

    shapes = [(2 + i % 30, 64 + 37 * i, 96 + 53 * i, i) for i in range(30)]
    with ThreadPoolExecutor(4) as pool:
        for got, want in pool.map(lambda s: _product(*s), shapes):
            _close(got, want, want.shape[1])


@needs_kernel
def test_the_kernel_works_in_a_forked_child():
    # the child has none of the parent's pool threads; it must start its own, not wait on them
    import multiprocessing

    _product(16, 4864, 896, 0)  # the parent's pool is running
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        got, want = pool.apply_async(_product, (16, 4864, 896, 1)).get(timeout=60)
    _close(got, want, 896)


def test_switched_off_by_the_environment_it_is_not_loaded_and_matmuls_still_use_openblas():
    probe = ("import mlx_refusal, mlx.core as mx; from mlx_refusal import backend; "
             "x = mx.ones((1, 8)) @ mx.ones((8, 3)); "
             "print(backend.blas_status(), backend.gemv_forward_count(), x.tolist())")
    out = subprocess.run([sys.executable, "-c", probe], env={**os.environ, backend.ENV_NO_GEMV_FORWARD: "1"},
                         capture_output=True, text=True, check=True).stdout
    assert f"OpenBLAS ({backend._loaded_blas}; no sgemv forward: disabled by {backend.ENV_NO_GEMV_FORWARD}" in out
    assert out.rstrip().endswith("None [[8.0, 8.0, 8.0]]")


def test_preloaded_for_stock_mlx_it_finds_openblas_itself_and_takes_the_one_row_products():
    # what `info` tells users to put in front of stock mlx_lm.generate: no mlx_refusal imported
    probe = ("import ctypes, os, mlx.core as mx; "
             "lib = ctypes.CDLL(os.environ['LD_PRELOAD'].split()[0]); lib.gemv_forward_count.restype = ctypes.c_ulonglong; "
             "before = lib.gemv_forward_count(); x = mx.arange(8.0)[None] @ mx.ones((8, 3)); "
             "wide = mx.ones((6, 8)) @ mx.ones((8, 3)); mx.eval(x, wide); "
             "print(lib.gemv_forward_count() - before, x.tolist(), wide.sum().item())")
    out = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "LD_PRELOAD": backend.stock_preload()},
                         capture_output=True, text=True, check=True).stdout.split(None, 1)
    assert out[0] == "1" and out[1].strip() == "[[28.0, 28.0, 28.0]] 144.0"


@needs_kernel
def test_preloaded_for_stock_mlx_the_few_row_products_take_the_kernel():
    probe = ("import ctypes, os, mlx.core as mx; "
             "lib = ctypes.CDLL(os.environ['LD_PRELOAD'].split()[0]); lib.skinny_count.restype = ctypes.c_ulonglong; "
             "before = lib.skinny_count(); x = mx.ones((8, 64)) @ mx.ones((32, 64)).T; mx.eval(x); "
             "print(lib.skinny_count() - before, x.sum().item())")
    out = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "LD_PRELOAD": backend.stock_preload()},
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "16384.0"]


def test_built_for_a_cpu_without_the_kernel_it_still_takes_the_one_row_products(tmp_path):
    # what an ARM Linux install builds: the kernel compiled out, the sgemv forward in
    import shutil

    source = Path(backend.__file__).with_name("_gemv_forward.c")
    cc = shutil.which("cc") or shutil.which("gcc")
    if not (cc and source.exists()):
        pytest.skip("no C compiler or no source here")
    lib = tmp_path / "forward_without_kernel.so"
    subprocess.run([cc, "-O2", "-DGEMV_FORWARD_NO_KERNEL", "-shared", "-fPIC", "-pthread", "-o", str(lib), str(source),
                    "-ldl"], check=True)
    probe = ("import ctypes, os, mlx.core as mx; lib = ctypes.CDLL(os.environ['LD_PRELOAD'].split()[0]); "
             "lib.skinny_count.restype = lib.gemv_forward_count.restype = ctypes.c_ulonglong; "
             "print(lib.skinny_set_width(512), lib.skinny_set_rows(24), lib.skinny_threads()); "
             "before = lib.gemv_forward_count(); a = mx.arange(8.0)[None] @ mx.ones((8, 3)); "
             "b = mx.ones((8, 64)) @ mx.ones((32, 64)).T; mx.eval(a, b); "
             "print(lib.gemv_forward_count() - before, lib.skinny_count(), a.tolist(), b.sum().item())")
    out = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "LD_PRELOAD": f"{lib} {backend._loaded_blas}"},
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["0 0 0", "1 0 [[28.0, 28.0, 28.0]] 16384.0"]


def test_preloaded_without_a_blas_after_it_says_so_instead_of_crashing_silently():
    probe = "import mlx.core as mx; print((mx.ones((1, 8)) @ mx.ones((8, 3))).tolist())"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env={**os.environ, "LD_PRELOAD": backend.stock_preload().split()[0]})
    assert proc.returncode != 0
    assert "_gemv_forward has no BLAS to call; preload an OpenBLAS after it" in proc.stderr
