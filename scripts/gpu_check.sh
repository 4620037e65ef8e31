#!/usr/bin/env bash
# Exercise every CUDA code path of unetcli on a machine with an NVIDIA GPU, in about 10 minutes:
#
#   1. the CUDA tests (pytest -m cuda tests/test_cuda.py);
#   2. AMP training on the shipped 2D demo data (bf16 where the GPU has it, and fp16 with its
#      gradient scaler), then predict + eval on the held-out test slices (held-out Dice);
#   3. scripts/bench_train.py and scripts/bench_infer.py on CUDA (JSON figures);
#   4. data-parallel training with NCCL on every visible GPU under torchrun (skipped with one GPU);
#   5. one markdown table (what, reference, unetcli, ratio) for the README, built from the JSON files.
#
# Run it from the project's Python environment (torch with CUDA, unetcli and the test extras):
#
#   bash scripts/gpu_check.sh                 # logs and figures in ./gpu_check_out
#   OUT=/tmp/gpu bash scripts/gpu_check.sh    # elsewhere
#
# Settings (environment): OUT (log folder), PYTHON (interpreter, default python), EPOCHS (demo
# training epochs, default 8, the demo's own budget), STEP_TIMEOUT (seconds one command may take,
# default 300). Every step writes its output to OUT/STEP.log; the script goes on after a failed
# step and exits 1 at the end if any failed. Without a CUDA GPU it exits 1 at once.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python}
EPOCHS=${EPOCHS:-8}
STEP_TIMEOUT=${STEP_TIMEOUT:-300}

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    about=$("$PY" -c 'import torch; cuda = torch.version.cuda or "none"; print(f"torch {torch.__version__}, CUDA build: {cuda}")' 2>/dev/null) \
        || about="torch cannot be imported by $PY"
    echo "gpu_check: no CUDA GPU visible to torch ($about); run this on a machine with an NVIDIA GPU and a CUDA build of torch" >&2
    exit 1
fi

OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT/runs"
OUT=$(cd "$OUT" && pwd)
PKG=$("$PY" -c 'import unetcli, pathlib; print(pathlib.Path(unetcli.__file__).parent)')
DEMO="$PKG/demo_data/mni_tissue_2d"
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
BF16=$("$PY" -c 'import torch; print(int(torch.cuda.is_bf16_supported()))')

"$PY" - >"$OUT/environment.log" 2>&1 <<'EOF'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}")
print(f"bf16 supported: {torch.cuda.is_bf16_supported()}")
EOF
cat "$OUT/environment.log"
echo "gpu_check: $GPUS GPU(s); logs and figures go to $OUT"

failed=()
started=$SECONDS
rm -f "$OUT/bench_train.json" "$OUT/bench_infer.json"  # the table must not show an earlier check's figures

# step NAME COMMAND...: run COMMAND with its output in OUT/NAME.log; report ok or FAILED (with the log's tail).
step() {
    local name=$1 log="$OUT/$1.log" begin=$SECONDS rc=0
    shift
    printf '== %-22s ' "$name"
    "$@" >"$log" 2>&1 || rc=$?
    if [ "$rc" -eq 0 ]; then
        echo "ok ($((SECONDS - begin)) s)  $log"
    else
        echo "FAILED (exit $rc, $((SECONDS - begin)) s)  $log"
        tail -n 15 "$log" | sed 's/^/   | /'
        failed+=("$name")
    fi
}

limit() { timeout "$STEP_TIMEOUT" "$@"; }

# amp_train PRECISION: train on the 2D demo data, predict the held-out slices, score them.
amp_train() {
    local precision=$1 run="$OUT/runs/2d_$1"
    rm -rf -- "$run"  # this script's own run folder from an earlier check: the log below must be this run's
    limit "$PY" -m unetcli train "$DEMO/train" --out "$run" --device cuda --precision "$precision" \
        --epochs "$EPOCHS" --set "model.features=[16,32,64,128]" --set train.iterations_per_epoch=40 || return
    grep -q "device cuda, precision $precision" "$run/log.txt" || { echo "log.txt does not say device cuda, precision $precision"; return 1; }
    limit "$PY" -m unetcli predict "$run" "$DEMO/test/images" "$run/predictions" --device cuda --precision "$precision" || return
    limit "$PY" -m unetcli eval "$run/predictions" "$DEMO/test/masks" --out "$run/eval" || return
    "$PY" -c 'import json, sys; d = json.load(open(sys.argv[1]))["foreground_mean"]["dice"]; print(f"held-out mean foreground Dice ({sys.argv[2]}): {d:.4f}")' \
        "$run/eval/summary.json" "$precision"
}

# ddp_train: one run on every visible GPU, NCCL, started by torchrun.
ddp_train() {
    local run="$OUT/runs/2d_ddp"
    rm -rf -- "$run"
    limit "$PY" -m torch.distributed.run --standalone --nproc-per-node "$GPUS" -m unetcli train "$DEMO/train" --out "$run" \
        --device cuda --epochs 1 --batch-size $((4 * GPUS)) --set "model.features=[16,32,64,128]" \
        --set train.iterations_per_epoch=20 || return
    grep -q "device cuda, .*world size $GPUS" "$run/log.txt" || { echo "log.txt does not say device cuda ... world size $GPUS"; return 1; }
    grep "world size" "$run/log.txt" | tail -n 1
}

step cuda_tests limit "$PY" -m pytest -q -n 0 -m cuda tests/test_cuda.py
if [ "$BF16" = 1 ]; then
    step train_2d_bf16 amp_train bf16
else
    echo "== train_2d_bf16         skipped: this GPU has no bf16"
fi
step train_2d_fp16 amp_train fp16
for precision in bf16 fp16; do
    if [ -f "$OUT/train_2d_$precision.log" ]; then
        grep "held-out mean foreground Dice" "$OUT/train_2d_$precision.log" | sed 's/^/   /' || true
    fi
done
step bench_train limit "$PY" scripts/bench_train.py --device cuda --steps 10 --rounds 3 --json "$OUT/bench_train.json"
step bench_infer limit "$PY" scripts/bench_infer.py --device cuda --rounds 3 --json "$OUT/bench_infer.json"
if [ "$GPUS" -ge 2 ]; then
    step ddp_nccl ddp_train
else
    echo "== ddp_nccl              skipped: one GPU visible; data-parallel training needs 2 or more"
fi

echo
if ! "$PY" - "$OUT" <<'EOF' | tee "$OUT/summary.md"; then
import json, sys
from pathlib import Path

import torch

out = Path(sys.argv[1])
rows = []


def load(name):
    path = out / name
    return json.loads(path.read_text()) if path.is_file() else None


train = load("bench_train.json")
for problem in (train or {}).get("problems", []):
    results = problem["results"]
    ref = results[0]
    shape = "x".join(map(str, problem["batch_shape"]))
    for r in results[1:]:
        name = r["variant"]["name"]
        if name.startswith("ours"):
            rows.append((f"{problem['dims']}D training step {shape}: {name} vs plain fp32 PyTorch",
                         f"{ref['throughput']:.1f} {r['unit']}", f"{r['throughput']:.1f} {r['unit']}", f"{r['ratio_vs_reference']:.2f}x"))

infer = load("bench_infer.json")
if infer:
    a, res = infer["args"], infer["results"]
    what = f"3D sliding window {'x'.join(map(str, a['size']))}, roi {a['roi']}"
    ref = res.get("monai")
    for method, r in res.items():
        if ref is not None and method != "monai" and method.startswith("ours"):
            rows.append((f"{what}: {method} vs MONAI fp32", f"{ref['seconds']:.2f} s", f"{r['seconds']:.2f} s",
                         f"{ref['seconds'] / r['seconds']:.2f}x"))

for precision in ("bf16", "fp16"):
    summary = out / "runs" / f"2d_{precision}" / "eval" / "summary.json"
    if summary.is_file():
        dice = json.loads(summary.read_text())["foreground_mean"]["dice"]
        rows.append((f"2D demo, {precision} training: held-out mean foreground Dice", "-", f"{dice:.3f}", "-"))

gpu = torch.cuda.get_device_name(0)
print(f"unetcli on {torch.cuda.device_count()} x {gpu} (torch {torch.__version__}, CUDA {torch.version.cuda})")
print()
print("| what | reference | unetcli | ratio |")
print("|---|---:|---:|---:|")
for row in rows:
    print("| " + " | ".join(row) + " |")
missing = [n for n, d in (("bench_train.json", train), ("bench_infer.json", infer)) if d is None]
print()
print("ratio: unetcli / reference throughput (training) or reference / unetcli time (inference), same process, same work; > 1 is faster."
      + (f" Missing (see the step logs): {', '.join(missing)}." if missing else ""))
EOF
    failed+=(summary_table)
fi

echo
echo "gpu_check: done in $((SECONDS - started)) s; logs in $OUT; table in $OUT/summary.md"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "gpu_check: FAILED steps: ${failed[*]}" >&2
    exit 1
fi
echo "gpu_check: all steps passed"
