#!/usr/bin/env bash
# Regenerate every paper table: runs notebooks/NN_*.ipynb in order with papermill.
#
#   ./run_all.sh                      smoke profile (synthetic data, CPU, minutes)
#   ./run_all.sh --profile full --data-root /data/pinpp_full
#   ./run_all.sh --profile rehearsal  the full settings on tiny synthetic data, CPU (results in data/rehearsal/results)
#   ./run_all.sh --only 00,01         just those notebooks
#   ./run_all.sh --profile full --only 05 --no-train
#                                     Table 3 from the released weights in <data root>/released, nothing trained
#
# Executed copies go to results/executed/. The first failing notebook stops the run: it is named,
# the exit status is non-zero, and results written by earlier notebooks stay as they are.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PROFILE=smoke DATA_ROOT="" ONLY="" RESULTS_DIR="" NO_TRAIN=""
usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }
value() {  # the value of option $1, or one clear line when it has none
  [[ $# -ge 2 && -n $2 && $2 != --* ]] || { echo "run_all.sh: $1 needs a value (see --help)" >&2; exit 2; }
}
while [[ $# -gt 0 ]]; do
  case "$1" in
    -p|--profile) value "$@"; PROFILE="$2"; shift 2 ;;
    --data-root) value "$@"; DATA_ROOT="$2"; shift 2 ;;
    --results-dir) value "$@"; RESULTS_DIR="$2"; shift 2 ;;
    --only) value "$@"; ONLY="$2"; shift 2 ;;
    --no-train) NO_TRAIN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run_all.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[[ $PROFILE == smoke || $PROFILE == rehearsal || $PROFILE == full ]] || { echo "run_all.sh: --profile must be smoke, rehearsal or full, not '$PROFILE'" >&2; exit 2; }
if [[ $PROFILE == full && -n $DATA_ROOT && ! -d $DATA_ROOT ]]; then
  echo "run_all.sh: --data-root $DATA_ROOT: no such folder; the full profile reads the data from there (layout: README.md, \"Data layout\")" >&2; exit 2
fi
if [[ -n $RESULTS_DIR && -e $RESULTS_DIR && ! -d $RESULTS_DIR ]]; then
  echo "run_all.sh: --results-dir $RESULTS_DIR: exists and is not a folder; pass a folder (created if missing)" >&2; exit 2
fi
if [[ -n $ONLY && ! $ONLY =~ ^[0-9]{2}(,[0-9]{2})*$ ]]; then
  echo "run_all.sh: --only '$ONLY': expected two-digit notebook numbers separated by commas, e.g. --only 00,05" >&2; exit 2
fi

"$ROOT/scripts/setup_env.sh"   # installs what is missing; a no-op when the venv is current
PY="$ROOT/.venv/bin/python"
if [[ $PROFILE == rehearsal && -z $RESULTS_DIR ]]; then  # rehearsal numbers stay beside its data (pinpp_lib/config.py)
  RESULTS_DIR="${DATA_ROOT:-$ROOT/data/rehearsal}/results"
fi
RESULTS="${RESULTS_DIR:-$ROOT/results}"
mkdir -p "$RESULTS/executed"

mapfile -t NOTEBOOKS < <(cd "$ROOT/notebooks" && ls [0-9][0-9]_*.ipynb | sort)
selected=()
for nb in "${NOTEBOOKS[@]}"; do
  if [[ -z $ONLY || ",$ONLY," == *",${nb:0:2},"* ]]; then selected+=("$nb"); fi
done
if [[ -n $ONLY ]]; then
  for want in ${ONLY//,/ }; do
    printf '%s\n' "${selected[@]}" | grep -q "^$want" || { echo "run_all.sh: no notebook notebooks/${want}_*.ipynb (have: ${NOTEBOOKS[*]})" >&2; exit 2; }
  done
fi

params=(-p PROFILE "$PROFILE")
[[ -n $DATA_ROOT ]] && params+=(-p DATA_ROOT "$(cd "$DATA_ROOT" 2>/dev/null && pwd || echo "$DATA_ROOT")")
[[ -n $RESULTS_DIR ]] && params+=(-p RESULTS_DIR "$RESULTS")
if [[ -n $NO_TRAIN ]]; then  # only notebook 05 has a no-training path (Table 3 from released weights)
  [[ $ONLY == 05 ]] || { echo "run_all.sh: --no-train goes with --only 05 (Table 3 from released weights); the other notebooks train what they report" >&2; exit 2; }
  params+=(-p TRAIN False)
fi
start=$SECONDS
for nb in "${selected[@]}"; do
  echo "== run_all: $nb (profile $PROFILE)"
  t0=$SECONDS
  if ! "$PY" -m papermill "$ROOT/notebooks/$nb" "$RESULTS/executed/$nb" "${params[@]}" \
        --cwd "$ROOT/notebooks" -k pinpp --progress-bar --request-save-on-cell-execute; then
    echo "run_all.sh: notebook $nb FAILED; see $RESULTS/executed/$nb. Results of earlier notebooks are intact." >&2
    exit 1
  fi
  echo "== run_all: $nb done in $((SECONDS - t0)) s"
done
echo "run_all: ${#selected[@]} notebook(s) in $((SECONDS - start)) s; tables in $RESULTS (index: $RESULTS/README.md)"
