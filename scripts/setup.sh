#!/usr/bin/env bash
# Create .venv on first use (and refresh it when setup.cfg changes); on Linux make sure a fast
# OpenBLAS is present for MLX's CPU build. Safe to run repeatedly: a stamp skips done work.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PY" -m venv .venv
fi

stamp=".venv/.mlx-refusal-$(cat setup.cfg setup.py pyproject.toml mlx_refusal/_gemv_forward.c | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing mlx-refusal and its dependencies into .venv" >&2
  .venv/bin/python -m pip install -q --upgrade pip >&2
  .venv/bin/python -m pip install -q -e '.[dev]' >&2
  rm -f .venv/.mlx-refusal-*
  touch "$stamp"
fi

# OpenBLAS is found the way the dynamic loader finds it (ldconfig's cache, else Python's own
# library search), so a library anywhere on the loader path counts and apt runs only when none is.
# (grep reads all of ldconfig's output: with pipefail, an early `grep -q` exit would fail the pipe.)
have_openblas() {
  { command -v ldconfig >/dev/null && ldconfig -p 2>/dev/null | grep 'libopenblas[a-z]*\.so' >/dev/null; } \
    || .venv/bin/python -c 'import ctypes.util, sys; sys.exit(0 if ctypes.util.find_library("openblas") else 1)'
}

if [ "$(uname -s)" = "Linux" ] && ! have_openblas; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian's OpenBLAS (libopenblas0-pthread)" >&2
    apt-get update -qq >&2 && apt-get install -y -qq libopenblas0-pthread >&2
  else
    echo "setup: no OpenBLAS found; MLX will run ~100x slower on this CPU. Fix: sudo apt-get install libopenblas0-pthread (Debian/Ubuntu) or sudo dnf install openblas-threads (Fedora)" >&2
  fi
fi
