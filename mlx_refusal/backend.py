"""Device and compute dtype, and a fast BLAS for MLX's Linux CPU build.

The `mlx[cpu]` wheel ships a slow reference BLAS (a 1024^3 sgemm takes ~0.4-0.9 s).
MLX resolves `cblas_sgemm` dynamically, so an OpenBLAS loaded with RTLD_GLOBAL *before*
`mlx.core` is imported wins the symbol lookup and makes the same product ~50-100x faster.
This module must therefore stay importable without importing `mlx.core` first.

Decoding is all products of a few rows (one per sequence) by the weights, where OpenBLAS 0.3.21's
sgemm packs the weights before it multiplies them: at one row it reads them at about a third of
the bandwidth its sgemv reaches. `_gemv_forward.c` (built by setup.py) is a `cblas_sgemm` that
takes products of 2-31 rows by transposed weights (x @ W.T, every Linear) on CPUs with AVX-512
or AVX2 to its own kernel, which reads the weights once where they lie, and hands other products
of 1-3 rows or one column to sgemv; it is loaded globally ahead of OpenBLAS, so it wins the
lookup, and gets OpenBLAS's own sgemm and sgemv to call.

OpenBLAS picks its kernels by the CPU model it recognises. One older than the CPU falls back to
generic SSE3 kernels: Debian 12's 0.3.21 runs sgemm on an AVX-512 Emerald Rapids Xeon at
62 GFLOP/s with its own pick ("Prescott") and at 301 GFLOP/s with OPENBLAS_CORETYPE=SkylakeX.
So before loading it, `_choose_kernels` measures the library's own pick and the kernel sets the
CPU's flags allow, each in a child process (the variable is read once, at load), and sets
OPENBLAS_CORETYPE to a set that gives right answers and runs sgemm >= 1.25x faster. The verdict
is cached per library and CPU; a variable the user set is never overridden.
"""
from __future__ import annotations

import ctypes
import glob
import importlib.machinery
import os
import sys
from pathlib import Path

ENV_BLAS_PATH = "MLX_REFUSAL_BLAS"  # path to a BLAS shared library to load instead of searching
ENV_NO_BLAS = "MLX_REFUSAL_NO_BLAS"  # set to 1 to keep MLX's bundled BLAS
ENV_NO_GEMV_FORWARD = "MLX_REFUSAL_NO_GEMV_FORWARD"  # set to 1 to leave every product on sgemm
ENV_CORETYPE = "OPENBLAS_CORETYPE"  # OpenBLAS's own: which kernel set to use instead of its pick
ENV_NO_KERNEL_PROBE = "MLX_REFUSAL_NO_KERNEL_PROBE"  # set to 1 to keep OpenBLAS's own kernel pick

# Kernel sets worth trying on x86-64, fastest first, with the CPU flags each needs.
KERNEL_SETS = [("SkylakeX", {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}),
               ("Haswell", {"avx2", "fma"})]
KERNEL_GAIN = 1.25  # a kernel set replaces the library's own pick only this much faster

# Usual places for a multithreaded OpenBLAS on Debian/Ubuntu, Fedora/RHEL and Arch.
_BLAS_CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/lib/libopenblas.so",
    "/usr/local/lib/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so",
]

_loaded_blas: str | None = None
_blas_message: str | None = None
_gemv_forward: ctypes.CDLL | None = None
_gemv_forward_message: str | None = None
_kernel_message: str | None = None  # for blas_status: which kernels, and why
_kernel_choice: str | None = None  # the OPENBLAS_CORETYPE this module set, if it set one


def _find_blas() -> str | None:
    explicit = os.environ.get(ENV_BLAS_PATH)
    if explicit:
        return explicit
    for path in _BLAS_CANDIDATES:
        if os.path.exists(path):
            return path
    for pattern in ("/usr/lib*/**/libopenblas*.so*",):
        hits = sorted(glob.glob(pattern, recursive=True))
        if hits:
            return hits[0]
    return None


def load_fast_blas() -> str | None:
    """Load OpenBLAS globally so MLX's CPU matmuls use it. Returns the path, or None.

    Only acts on Linux, only before `mlx.core` is imported, and only once.
    """
    global _loaded_blas, _blas_message
    if _loaded_blas is not None or _blas_message is not None:
        return _loaded_blas
    if not sys.platform.startswith("linux"):
        _blas_message = "not needed (MLX uses Accelerate/Metal on macOS)"
        return None
    if os.environ.get(ENV_NO_BLAS, "") not in ("", "0"):
        _blas_message = f"disabled by {ENV_NO_BLAS}"
        return None
    if "mlx.core" in sys.modules:
        _blas_message = "mlx.core was imported before mlx_refusal; import mlx_refusal first"
        _warn(f"fast BLAS not loaded: {_blas_message}")
        return None
    path = _find_blas()
    if path is None:
        _blas_message = "no OpenBLAS found"
        _warn(
            "no OpenBLAS found, MLX CPU matmuls will be ~100x slower; fix: "
            f"`sudo apt-get install libopenblas0-pthread` (or set {ENV_BLAS_PATH}=/path/to/libopenblas.so)"
        )
        return None
    _choose_kernels(path)
    try:
        blas = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
        _load_gemv_forward(blas)
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)  # after the forward, so its cblas_sgemm wins
    except OSError as exc:
        _blas_message = f"could not load {path}: {exc}"
        _warn(f"fast BLAS not loaded: {_blas_message}; fix: set {ENV_BLAS_PATH} to a working libopenblas")
        return None
    _loaded_blas = path
    return path


def _cpu() -> tuple[str, set[str]]:
    """(the CPU's identity, its flags) from /proc/cpuinfo: ("", set()) where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return "", set()
    fields = dict(line.split(":", 1) for line in text.split("\n\n", 1)[0].splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    ident = "|".join(fields.get(k, "") for k in ("vendor_id", "cpu family", "model", "model name", "stepping"))
    return ident, set(fields.get("flags", "").split())


def kernel_verdict(own: dict, tried: dict[str, dict]) -> str | None:
    """The kernel set to load, given probe results (`_blas_probe.probe`) of the library's own pick
    `own` and of each set tried: the fastest set with right answers that beats a right `own` by
    KERNEL_GAIN. None keeps the library's pick."""
    right = {name: r["gflops"] for name, r in tried.items() if r.get("right")}
    best = max(right, key=right.get, default=None)
    if best is None or (own.get("right") and right[best] < KERNEL_GAIN * own["gflops"]):
        return None
    return best


def _probe(path: str, coretype: str | None) -> dict:
    import json
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != ENV_CORETYPE}
    if coretype:
        env[ENV_CORETYPE] = coretype
    script = Path(__file__).with_name("_blas_probe.py")
    try:
        out = subprocess.run([sys.executable, "-I", str(script), path], env=env, capture_output=True, text=True,
                             timeout=60)
        return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"right": False}
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return {"right": False}


def _read_verdict(memo: Path, sets: list[str]) -> dict | None:
    """A cached verdict, or None where it is missing or damaged (then it is measured again)."""
    import json

    try:
        found = json.loads(memo.read_text())
        choice, own = found["choice"], found["own"]
        if choice is None or (choice in sets and isinstance(found["tried"][choice]["gflops"], (int, float))):
            return found if isinstance(own, dict) else None
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _choose_kernels(path: str) -> None:
    """Set OPENBLAS_CORETYPE (in this process, so children inherit it) where OpenBLAS's own kernel
    pick is much slower than a set this CPU supports; see the module's docstring."""
    global _kernel_message, _kernel_choice
    if os.environ.get(ENV_CORETYPE):
        _kernel_message = f"{ENV_CORETYPE}={os.environ[ENV_CORETYPE]} from the environment"
        return
    if os.environ.get(ENV_NO_KERNEL_PROBE, "") not in ("", "0"):
        _kernel_message = f"OpenBLAS's own pick ({ENV_NO_KERNEL_PROBE})"
        return
    ident, flags = _cpu()
    sets = [name for name, needs in KERNEL_SETS if needs <= flags]
    if not sets:
        return
    import hashlib
    import json

    from .paths import cache_dir

    st = os.stat(path)
    key = hashlib.sha256(json.dumps([os.path.realpath(path), st.st_size, st.st_mtime_ns, ident, sorted(flags), sets,
                                     KERNEL_GAIN]).encode()).hexdigest()[:24]
    memo = cache_dir("blas") / f"kernels-{key}.json"
    found = _read_verdict(memo, sets)
    if found is None:
        own = _probe(path, None)
        tried = {name: _probe(path, name) for name in sets}
        found = {"own": own, "tried": tried, "choice": kernel_verdict(own, tried)}
        from .atomic import write_text_atomic

        try:
            write_text_atomic(memo, json.dumps(found, indent=1))
        except OSError:
            pass  # a read-only cache costs the probe again next time, nothing else
    own, choice = found["own"], found["choice"]
    if choice is None:
        return
    os.environ[ENV_CORETYPE] = _kernel_choice = choice
    _kernel_message = (f"{choice} kernels: OpenBLAS's own pick, {own.get('corename', '?')}, ran sgemm at "
                       f"{own.get('gflops', 0):.0f} GFLOP/s, {choice} at {found['tried'][choice]['gflops']:.0f}")


def _gemv_forward_path() -> Path | None:
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (here / f"_gemv_forward{suffix}").exists():
            return here / f"_gemv_forward{suffix}"
    return None


def _load_gemv_forward(blas: ctypes.CDLL) -> None:
    global _gemv_forward, _gemv_forward_message
    if os.environ.get(ENV_NO_GEMV_FORWARD, "") not in ("", "0"):
        _gemv_forward_message = f"disabled by {ENV_NO_GEMV_FORWARD}"
        return
    path = _gemv_forward_path()
    if path is None:
        _gemv_forward_message = "not built (no C compiler at install time)"
        return
    if not (hasattr(blas, "cblas_sgemm") and hasattr(blas, "cblas_sgemv")):
        _gemv_forward_message = "the BLAS has no cblas_sgemv"
        return
    try:
        lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        _gemv_forward_message = f"could not load {path.name}: {exc}"
        return
    lib.gemv_forward_init(ctypes.cast(blas.cblas_sgemm, ctypes.c_void_p),
                          ctypes.cast(blas.cblas_sgemv, ctypes.c_void_p))
    lib.gemv_forward_enable.argtypes = [ctypes.c_int]
    lib.gemv_forward_count.restype = ctypes.c_ulonglong
    lib.skinny_set_rows.argtypes = [ctypes.c_int]
    lib.skinny_set_width.argtypes = [ctypes.c_int]
    lib.skinny_count.restype = ctypes.c_ulonglong
    _gemv_forward = lib


def gemv_forward_enable(on: bool) -> bool:
    """Turn the sgemv forward on or off (benchmarks time both in one process). Returns whether
    the forward is loaded at all."""
    if _gemv_forward is not None:
        _gemv_forward.gemv_forward_enable(int(on))
    return _gemv_forward is not None


def skinny_rows(rows: int | None = None) -> int:
    """The most rows of a product by transposed weights that go to the forward's own kernel (0: it
    is off, or not here: no library, or neither AVX-512 nor AVX2). `rows` sets it first (0 turns it off;
    benchmarks time both paths in one process)."""
    if _gemv_forward is None:
        return 0
    return int(_gemv_forward.skinny_set_rows(-1 if rows is None else max(int(rows), 0)))


def skinny_width(bits: int | None = None) -> int:
    """The vector width of the forward's own kernel: 512 (AVX-512), 256 (AVX2 with FMA) or 0 (none
    here). `bits` picks one the CPU has first, with that width's default rows (`skinny_rows`), as a
    CPU with no wider one runs it (tests and benchmarks run both where it has both)."""
    if _gemv_forward is None:
        return 0
    return int(_gemv_forward.skinny_set_width(-1 if bits is None else int(bits)))


def skinny_count() -> int | None:
    """How many products went to the forward's own kernel so far, or None if it is not loaded."""
    return None if _gemv_forward is None else int(_gemv_forward.skinny_count())


def gemv_forward_count() -> int | None:
    """How many products went to sgemv so far, or None if the forward is not loaded."""
    return None if _gemv_forward is None else int(_gemv_forward.gemv_forward_count())


def _warn(line: str) -> None:
    print(f"mlx-refusal: warning: {line}", file=sys.stderr)


def blas_status() -> str:
    """One phrase for `info`: which BLAS MLX's CPU matmuls use."""
    if _loaded_blas:
        forward = f"no sgemv forward: {_gemv_forward_message}"
        if _gemv_forward:
            rows = skinny_rows()
            isa = {512: "AVX-512", 256: "AVX2"}.get(skinny_width(), "")
            forward = ((f"products of 2-{rows} rows on its own kernel ({isa}), " if rows >= 2 else "")
                       + "products of 1-3 rows on sgemv")
        kernels = f"; {_kernel_message}" if _kernel_message else ""
        return f"OpenBLAS ({_loaded_blas}; {forward}{kernels})"
    return f"bundled reference BLAS ({_blas_message})" if _blas_message else "unknown"


def stock_preload() -> str | None:
    """The LD_PRELOAD value that gives another process (stock `mlx_lm.generate`) the BLAS this one
    has: the sgemv forward ahead of OpenBLAS, so it wins the lookup and finds OpenBLAS after it."""
    if not _loaded_blas:
        return None
    return f"{_gemv_forward._name} {_loaded_blas}" if _gemv_forward else _loaded_blas


def stock_env() -> dict[str, str]:
    """The environment another process (stock `mlx_lm.generate`) needs for this one's BLAS:
    LD_PRELOAD, and OPENBLAS_CORETYPE where this module chose the kernels."""
    preload = stock_preload()
    env = {"LD_PRELOAD": preload} if preload else {}
    if preload and _kernel_choice:
        env[ENV_CORETYPE] = _kernel_choice
    return env


def fast_blas_active() -> bool:
    return _loaded_blas is not None or sys.platform == "darwin"


def device_name() -> str:
    import mlx.core as mx

    dev = mx.default_device()
    if dev.type == mx.gpu:
        if sys.platform == "darwin":
            return "Metal GPU"
        return "CUDA GPU"
    return "CPU"


def on_cpu() -> bool:
    import mlx.core as mx

    return mx.default_device().type == mx.cpu


def compute_dtype(stored_dtype=None):
    """float32 on the CPU (half-precision CPU matmuls never reach BLAS); the stored dtype on a GPU."""
    import mlx.core as mx

    if on_cpu() or stored_dtype is None:
        return mx.float32
    return stored_dtype
