#!/usr/bin/env bash
# Run the test suite (installs the environment first if it is missing).
#   ./run_tests.sh                  tier 1: unit + integration tests, no papermill (≤ 10 min on 2 cores)
#   ./run_tests.sh -m notebooks     tier 2: papermill smoke runs of the notebooks
#   ./run_tests.sh -m slow          tier 3: long checks (a notebook run twice and compared; every notebook under
#                                   the rehearsal profile, ≈ 1 h)
#   ./run_tests.sh -m gpu           tests that need CUDA
# Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest "$@"
