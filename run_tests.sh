#!/usr/bin/env bash
# Run the test suite (installs the environment first if it is missing).
#   ./run_tests.sh                  unit tests + smoke papermill run of the notebooks
#   ./run_tests.sh -m slow          opt-in slow tests;  -m gpu: tests that need CUDA
# Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest "$@"
