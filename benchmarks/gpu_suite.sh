#!/usr/bin/env bash
# The GPU benchmark suite in one command, for a machine with CUDA PyTorch but without MONAI, ignite, MLflow,
# nibabel or pydicom (they are installed from a local wheel folder made beforehand, offline).
#
#   bash benchmarks/gpu_suite.sh [--dry-run] [--data DIR] [--wheels DIR] [--out DIR] [--budget SECONDS]
#
# From the repository root. Stages, each under `timeout` so that the whole suite ends within the budget
# (default 540 s = 9 minutes, the install included; a stage cut short is logged and the suite goes on):
#   1. install the wheels of --wheels (default .whl, made by wheels.sh) into a temporary folder on PYTHONPATH;
#   2. benchmarks/step_cost.py with bf16 autocast and channels_last, all methods, one run per workload
#      (at most 100 s each; the data-wait rows with the 2D U-Net);
#   3. the same with --compile for standard, PGD-AT and IMA on the 2D workloads (at most 120 s; a subset, as
#      every method of every workload compiles graphs of its own);
#   4. studies/dermamnist_gpu.yaml through `medrobust study`, if that file exists, in the time left (data.root
#      pointed at the data folder, MLflow in a local SQLite file).
# Data: --data DIR or MEDROBUST_DATA (default .data, a folder ignored by git), laid out like ../shared/data
# (dermamnist/dermamnist.npz, isic2017/). Results go under --out or $OUT (default outputs/gpu-suite):
# suite.log, summary.md (the step-cost tables and the study's table) and results.tar.gz (every file written).
# --dry-run: check the install line on the wheel folder and the commands (--help), run nothing else (CPU).
set -uo pipefail

DRY=0
DATA="${MEDROBUST_DATA:-.data}"
WHEELS="${MEDROBUST_WHEELS:-.whl}"
DEST="${OUT:-outputs/gpu-suite}"
BUDGET="${GPU_SUITE_BUDGET:-540}"
STUDY="studies/dermamnist_gpu.yaml"
PYTHON="${PYTHON:-python3}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --data) DATA="$2"; shift ;;
    --wheels) WHEELS="$2"; shift ;;
    --out) DEST="$2"; shift ;;
    --budget) BUDGET="$2"; shift ;;
    --study) STUDY="$2"; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu_suite.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

mkdir -p "$DEST" || exit 2
DEST="$(cd "$DEST" && pwd)"
WORK="$(mktemp -d)"
LOG="$DEST/suite.log"
: > "$LOG"
log() { echo "[gpu_suite +${SECONDS}s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET - SECONDS )); }
# stage NAME CAP COMMAND...: run under timeout min(CAP, time left - 15 s); a stage that fails or times out is
# logged and the suite goes on
stage() {
  local name="$1" cap="$2"; shift 2
  local limit; limit=$(( $(left) - 15 ))
  [ "$limit" -gt "$cap" ] && limit="$cap"
  local shown; shown="$(printf '%q ' "$@")"
  if [ "$DRY" = 1 ]; then log "would run ($name, at most ${cap} s): $shown"; return 0; fi
  if [ "$limit" -lt 30 ]; then log "$name: skipped, ${limit} s left of the budget"; return 0; fi
  log "$name: start (at most ${limit} s): $shown"
  timeout --signal=INT --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  if [ "$rc" = 0 ]; then log "$name: done"; else log "$name: FAILED or timed out (exit $rc)"; fi
  return 0
}

# 1. install ------------------------------------------------------------------------------------------------
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
shopt -u nullglob
if [ "${#wheels[@]}" = 0 ]; then
  log "no wheels in '$WHEELS': run ../shared/gpu/wheels.sh (or pip download) from the repository root first"
  exit 2
fi
SITE="$WORK/site"
log "install ${#wheels[@]} wheels from $WHEELS"
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
  "${wheels[@]}" >> "$LOG" 2>&1 || { log "the wheel install failed (see above)"; exit 2; }
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
for whl in "${wheels[@]}"; do   # every wheel's distribution must now be importable metadata from $SITE
  dist="$(basename "$whl" | cut -d- -f1)"
  ls -d "$SITE/${dist}"-*.dist-info >/dev/null 2>&1 || { log "wheel $whl did not install into $SITE"; exit 2; }
done
log "installed into $SITE; python $("$PYTHON" -c 'import sys; print(sys.version.split()[0])'), torch \
$("$PYTHON" -c 'import torch; print(torch.__version__, "cuda", torch.cuda.is_available())' 2>&1)"

# 2-4. the commands ----------------------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  "$PYTHON" -m benchmarks.step_cost --help > /dev/null || { log "benchmarks.step_cost --help failed"; exit 1; }
  "$PYTHON" -m pipeline.cli study --help > /dev/null || { log "medrobust study --help failed"; exit 1; }
  log "commands check: benchmarks.step_cost and medrobust study answer --help"
fi
# one step_cost run per workload, so that a workload cut short by its time limit loses only its own rows
for workload in resnet18_224 unet2d_256 unet3d_96; do
  waits=""; [ "$workload" = unet2d_256 ] && waits="standard,ima"      # the data-wait rows, once
  stage "step_cost $workload bf16 channels_last" 100 \
    "$PYTHON" -m benchmarks.step_cost --device cuda --amp bf16 --channels-last --workloads "$workload" \
    --data "$DATA" --data-methods "$waits" --out "$WORK/step_cost_$workload"
done
stage "step_cost bf16 channels_last compile" 120 \
  "$PYTHON" -m benchmarks.step_cost --device cuda --amp bf16 --channels-last --compile \
  --workloads resnet18_224,unet2d_256 --methods standard,pgd_at,ima --data-methods "" --iters 10 \
  --out "$WORK/step_cost_compile"
if [ -f "$STUDY" ]; then
  study_file="$WORK/$(basename "$STUDY")"
  npz="$(cd "$(dirname "$DATA")" 2>/dev/null && pwd)/$(basename "$DATA")/dermamnist/dermamnist.npz"
  # the study as written, with its base config made absolute, data.root on the data folder, outputs in $WORK
  "$PYTHON" - "$STUDY" "$study_file" "$npz" "$WORK/study" <<'EOF' || log "could not prepare $STUDY"
import sys
from pathlib import Path
import yaml
src, dst, npz, out = sys.argv[1:]
spec = yaml.safe_load(Path(src).read_text())
spec["base"] = str((Path(src).parent / spec["base"]).resolve())
spec["output_dir"] = out
if Path(npz).is_file():
    spec.setdefault("set", {})["data.root"] = npz
Path(dst).write_text(yaml.safe_dump(spec, sort_keys=False))
EOF
  export MLFLOW_TRACKING_URI="sqlite:///$WORK/mlflow.db"
  stage "study $STUDY" "$BUDGET" "$PYTHON" -m pipeline.cli study "$study_file"
else
  log "no $STUDY: study stage skipped"
fi

# results ---------------------------------------------------------------------------------------------------
if [ "$DRY" = 0 ]; then
  {
    echo "# GPU suite, $(date -u '+%Y-%m-%d %H:%M UTC')"
    for f in "$WORK"/step_cost_*/step_cost.md; do
      [ -f "$f" ] && { echo; echo "## $(basename "$(dirname "$f")")"; echo; cat "$f"; }
    done
    for f in "$WORK"/study/*.md; do
      [ -f "$f" ] && { echo; echo "## study: $(basename "$f")"; echo; cat "$f"; }
    done
  } > "$DEST/summary.md"
  tar -czf "$DEST/results.tar.gz" -C "$WORK" --exclude=site --exclude='*.pt' . 2>> "$LOG"
fi
log "finished in ${SECONDS} s; results in $DEST"
rm -rf "$WORK"
exit 0
