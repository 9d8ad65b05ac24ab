#!/usr/bin/env bash
# The prepared GPU check (issue 19): one script, ≤ 8 min on a single-GPU machine with its own Python and torch and no
# network, writing one JSON report into the folder it is given.
#
#   scripts/gpu_check.sh OUT_DIR          on the GPU machine (device tool: `run` with command
#                                         `scripts/gpu_check.sh $OUT`, carry .whl — see benchmarks/README.md)
#   scripts/gpu_check.sh OUT_DIR --cpu    the same steps at CPU sizes: a dry run (slow test tier)
#
# Steps (each under its own time limit; a failed step is recorded, the others still run):
#   gpu_tests    the `gpu` test tier (tests/test_gpu.py)
#   bench_train  ResNet-50 / 224 / bf16 / channels_last, batch 128: vanilla AT, MPM AT, clean step (img/s, ratios)
#   profile      torch.profiler of the PGD-2 AT step with and without the bypass: the operators MPM adds
#   bench_data   image + 16-bit mask loading, 16 workers, ImageNet-sized JPEGs made on the spot (samples/s)
#   torchrun     one-process torchrun MPM AT run of the rehearsal profile (ResNet-50 at 224, 1000 classes), a few steps
#   mmdet        a Mask R-CNN iteration where mmcv's CUDA ops are importable, else "skipped" with the reason
# Python packages the machine lacks travel as wheels in .whl/ (installed into a private folder, never into the system).
set -uo pipefail
OUT="${1:?usage: scripts/gpu_check.sh OUT_DIR [--cpu]}"
MODE="${2:-gpu}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
mkdir -p "$OUT"
PY="${PINPP_PYTHON_BIN:-$([[ -x $ROOT/.venv/bin/python ]] && echo "$ROOT/.venv/bin/python" || echo python3)}"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/pinpp_site .whl/*.whl \
    && export PYTHONPATH="/tmp/pinpp_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
: >"$OUT/steps.jsonl"
step() {  # step NAME SECONDS CMD...: run, log to $OUT/NAME.log, record rc and seconds
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  printf '{"step": "%s", "rc": %d, "seconds": %d}\n' "$name" "$rc" "$((SECONDS - t0))" >>"$OUT/steps.jsonl"
  echo "gpu_check: $name rc=$rc in $((SECONDS - t0)) s"
}
# time limits (s) per step; on the GPU they add up to 8 min at most (the issue's budget)
if [[ $MODE == --cpu ]]; then
  TRAIN=(--arch tiny --size 64 --batch 4 --steps 2 --aa-images 8); DATA=(--images 32 --size 256 --workers 2); STEPS=2; BATCH=4
  PROF=(--arch tiny --size 64 --batch 4 --steps 2)
  LIMIT=(600 900 600 1200 120 300)
else
  TRAIN=(--arch r50 --size 224 --batch 128 --steps 10); DATA=(--images 1024 --size 450 --workers 16); STEPS=5; BATCH=64
  PROF=(--arch r50 --size 224 --batch 128 --steps 3)
  LIMIT=(90 110 60 150 30 40)
fi
step gpu_tests "${LIMIT[0]}" "$PY" -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider
step bench_train "${LIMIT[1]}" "$PY" benchmarks/bench_train.py "${TRAIN[@]}" --json "$OUT/bench_train.json"
step profile "${LIMIT[5]}" "$PY" benchmarks/profile_at_step.py "${PROF[@]}" --json "$OUT/profile.json"
step bench_data "${LIMIT[2]}" "$PY" benchmarks/bench_data.py "${DATA[@]}" --json "$OUT/bench_data.json"
REH="$(mktemp -d)"
step torchrun "${LIMIT[3]}" bash -c "'$PY' -m pinpp_lib prepare --profile rehearsal --data-root '$REH' && \
  '$PY' -m torch.distributed.run --standalone --nproc_per_node 1 -m pinpp_lib train at_mpm --profile rehearsal \
    --data-root '$REH' --set seg_dir=seg --set max_steps=$STEPS --set batch_size=$BATCH"
rm -rf "$REH"
step mmdet "${LIMIT[4]}" "$PY" -c "
import torch, sys
try:
    from mmcv.ops import RoIAlign  # noqa: F401
except Exception as e:
    print('skipped: mmcv with compiled ops is not importable here (' + type(e).__name__ + ': ' + str(e)[:120] + ')'); sys.exit(0)
from pinpp_lib.segmentation import SegConfig, train
print('mmdet importable; run: pinpp seg-train --profile smoke --model mask_rcnn_r50_fpn --set iters=20 --set device=cuda')
"
"$PY" - "$OUT" "$MODE" <<'PY'
import json, platform, subprocess, sys
from pathlib import Path
out, mode = Path(sys.argv[1]), sys.argv[2]
report = {"mode": mode, "python": platform.python_version(), "steps": [json.loads(l) for l in (out / "steps.jsonl").read_text().splitlines()]}
try:
    import torch
    report["torch"] = torch.__version__
    report["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
except Exception as e:  # noqa: BLE001
    report["torch"] = f"not importable: {e}"
for name in ("bench_train", "bench_data", "profile"):
    f = out / f"{name}.json"
    report[name] = json.loads(f.read_text()) if f.exists() else None
report["mmdet"] = (out / "mmdet.log").read_text().strip().splitlines()[-1:] if (out / "mmdet.log").exists() else None
(out / "gpu_report.json").write_text(json.dumps(report, indent=1))
print(json.dumps(report, indent=1))
PY
