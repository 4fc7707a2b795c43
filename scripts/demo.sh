#!/usr/bin/env bash
# Set up (idempotently) and run the live demo; arguments go to `pgnotify-sync demo`.
#   scripts/demo.sh                    # throwaway PostgreSQL, a writer, live events
#   scripts/demo.sh --restart-server   # restart the server half-way: nothing is lost
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
exec .venv/bin/pgnotify-sync demo "$@"
