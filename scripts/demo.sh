#!/usr/bin/env bash
# Install what is missing, then train on the embedded digits set with 2 Horovod ranks.
# Extra arguments are KEY=VALUE overrides, e.g. scripts/demo.sh seed=3 strategy=ddp
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$REPO/scripts/install.sh"
export PATH="$REPO/.venv/bin:$PATH"
cd "$REPO"
exec hvd-launch -np 2 -- hvd-train digits run_dir=runs/digits-demo checkpoint.resume=never "$@"
