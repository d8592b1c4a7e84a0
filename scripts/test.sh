#!/usr/bin/env bash
# Install what is missing, then run every test (unit, then multi-rank under real mpirun).
# Extra arguments go to pytest, e.g. scripts/test.sh -k resume
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$REPO/scripts/install.sh"
export PATH="$REPO/.venv/bin:$PATH"
cd "$REPO"
exec python -m pytest "$@"
