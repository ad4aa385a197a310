#!/usr/bin/env bash
# Sets up .venv (and the browser-test tools) on first use, then runs the whole test suite:
# fast unit + property tests, the real-model tier and the browser test.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
if [ -f scripts/setup_web.sh ]; then bash scripts/setup_web.sh; fi
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
# pytest exits 5 when no test ran: that is a failure here, not a success.
if [ "$rc" = 5 ]; then echo "test.sh: no tests ran" >&2; exit 1; fi
exit "$rc"
