#!/usr/bin/env bash
# Browser-test tools for the web page: Debian's headless Chromium and the page's pinned npm
# packages (export/package-lock.json) in export/node_modules. Safe to run repeatedly: each step is
# skipped when already done. Never downloads a browser of its own (no `npx playwright install`).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "setup_web: installing Debian's chromium" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >&2
  else
    echo "setup_web: /usr/bin/chromium is missing; the browser test will be skipped. Fix: sudo apt-get install chromium" >&2
  fi
fi

if ! command -v npm >/dev/null; then
  echo "setup_web: npm is missing; the page's JS runtime cannot be installed. Fix: sudo apt-get install nodejs npm" >&2
  exit 0
fi

# Reinstall when the lockfile changes. export/.npmrc sets ignore-scripts: transformers.js pulls in
# onnxruntime-node, whose install script downloads native binaries the page never uses.
stamp="export/node_modules/.setup-$(sha256sum export/package-lock.json | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup_web: installing the page's pinned npm packages (npm ci in export/)" >&2
  (cd export && npm ci --no-audit --no-fund --ignore-scripts >&2)
  touch "$stamp"
fi

# The few runtime files the page loads, copied to export/vendor so `export-onnx --with-page`
# (which copies export/ without node_modules) ships a page that runs from any static host.
if [ -x .venv/bin/python ]; then
  .venv/bin/python -c 'import mlx_refusal.serve as s; s.sync_vendor()'
fi
