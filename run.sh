#!/usr/bin/env bash
# Quick start: sets up .venv on first use, then runs the CLI, e.g. `./run.sh steer`.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/python cli.py "$@"
