#!/usr/bin/env bash
# GPU integration checks for issue 5 point 6, run from the repository root on a GPU machine with binaries built
# elsewhere (BUILD, default build-cbc) and their shared libraries in .devlib:
#   1. the tiny demo (configs/tiny.yaml) pretrained on the GPU: its validation losses, to set beside the CPU run's
#   2. a small model trained 8 steps on the CPU and on the GPU, and 4 + 4 steps across backends both ways
#      (a checkpoint written by one backend resumed by the other), every step's loss printed
# Logs and metrics go to $OUT (or /tmp).
set -u
build=${BUILD:-build-cbc}
out=${OUT:-/tmp}
binary="$PWD/$build/modernbert"
export LD_LIBRARY_PATH="$PWD/.devlib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
work=$(mktemp -d)

if ! compgen -G "data/shards/train-*.mbs" >/dev/null; then
    "$binary" tokenize --output data/shards --val-fraction 0.02 --quiet --overwrite data/corpus/*.jsonl.zst || exit 1
fi

steps=${MB_INTEGRATION_STEPS:-"demo cross curve"}
if [[ $steps == *demo* ]]; then
echo "== 1. tiny demo on the GPU"
start=$(date +%s)
"$binary" pretrain configs/tiny.yaml run.output_dir="$work/demo" logging.progress_bar=false >"$out/gpu_demo.log" 2>&1
echo "exit $? in $(( $(date +%s) - start )) s"
grep -E "backend|validation|^done" "$out/gpu_demo.log"
cp "$work/demo/metrics.jsonl" "$out/gpu_demo_metrics.jsonl"
fi

small="model.hidden_size=32 model.intermediate_size=48 model.num_hidden_layers=2 model.num_attention_heads=1
       phases.0.micro_batch_tokens=1024 phases.0.batch_tokens=2048 logging.every_steps=1 logging.val_every_steps=0
       checkpoint.every_steps=4 logging.progress_bar=false"
losses() { grep -o '"step_loss": [0-9.]*' "$1/metrics.jsonl" | awk '{printf "%s ", $2} END {print ""}'; }
run_small() { # dir backend [--resume] [--max-steps N]
    local dir=$1 backend=$2
    shift 2
    # shellcheck disable=SC2086
    "$binary" pretrain configs/tiny.yaml run.output_dir="$dir" run.backend="$backend" $small "$@" >>"$out/gpu_cross.log" 2>&1
}
if [[ $steps == *cross* ]]; then
echo "== 2. 8 steps per backend, and 4 + 4 across backends"
run_small "$work/cpu" cpu --max-steps 8
run_small "$work/gpu" cuda --max-steps 8
run_small "$work/cpu_gpu" cpu --max-steps 4 && run_small "$work/cpu_gpu" cuda --resume --max-steps 8
run_small "$work/gpu_cpu" cuda --max-steps 4 && run_small "$work/gpu_cpu" cpu --resume --max-steps 8
for run in cpu gpu cpu_gpu gpu_cpu; do printf "%-8s %s\n" "$run" "$(losses "$work/$run")"; done
grep -E "resume:|error" "$out/gpu_cross.log" | head
fi
rm -rf "$work"

if [[ $steps == *curve* ]]; then
echo "== 3. a few hundred steps of the tiny config (hidden 64, 300 steps of 2048 token slots at 128) on the CPU and the GPU"
curve() { # dir backend
    "$binary" pretrain configs/tiny.yaml run.output_dir="$1" run.backend="$2" phases.0.tokens=600K \
        model.hidden_size=64 model.intermediate_size=96 model.num_attention_heads=2 phases.0.micro_batch_tokens=1024 \
        phases.0.batch_tokens=2048 phases.0.warmup_tokens=60K logging.every_steps=1 logging.val_every_steps=100 logging.progress_bar=false \
        checkpoint.every_steps=0 >"$out/curve_$2.log" 2>&1
}
work=$(mktemp -d)
start=$(date +%s); curve "$work/cpu" cpu; echo "cpu: exit $? in $(( $(date +%s) - start )) s"
start=$(date +%s); curve "$work/gpu" cuda; echo "gpu: exit $? in $(( $(date +%s) - start )) s"
cp "$work/cpu/metrics.jsonl" "$out/curve_cpu_metrics.jsonl"
cp "$work/gpu/metrics.jsonl" "$out/curve_gpu_metrics.jsonl"
paste <(grep -E "validation" "$out/curve_cpu.log") <(grep -E "validation" "$out/curve_gpu.log" | sed 's/^step *[0-9]* |//')
python3 - "$work/cpu/metrics.jsonl" "$work/gpu/metrics.jsonl" <<'PY'
import json, sys
def losses(path):
    return [r["step_loss"] for r in map(json.loads, open(path)) if "step_loss" in r]
cpu, gpu = losses(sys.argv[1]), losses(sys.argv[2])
n = min(len(cpu), len(gpu))
diffs = [abs(a - b) / abs(a) for a, b in zip(cpu[:n], gpu[:n])]
print(f"{n} steps; step-loss relative difference GPU vs CPU: mean {sum(diffs)/n:.2e}, max {max(diffs):.2e}, "
      f"last 50 mean {sum(diffs[-50:])/len(diffs[-50:]):.2e}; final loss cpu {cpu[n-1]:.4f} gpu {gpu[n-1]:.4f}")
PY
rm -rf "$work"
fi
