#!/usr/bin/env bash
# Set up (idempotently) and run the test suite; arguments go to pytest.
#   scripts/test.sh                      # everything under tests/
#   scripts/test.sh -m "not integration" # unit tests only, no PostgreSQL
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest "$@"
