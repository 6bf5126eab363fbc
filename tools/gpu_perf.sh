#!/usr/bin/env bash
# The issue-6 measurements in one command on a machine with 1–4 GPUs, from the repository root (the commands of the
# session-3 device calls, docs/performance.md). Binaries are built elsewhere (MB_GPU_BUILD, default build-cuda) and
# carried here with the shared libraries the GPU machine lacks in .devlib/ (../shared/tools/device-bundle).
#   GPU 0: `modernbert bench attention` (1024- and 8192-token documents) and `bench train` for base @1024, base @8192,
#          large @1024 (32,768 tokens per step; tools/gpu_clocks.sh adds the SM clock and power under load), then
#          base @1024 with run.recompute norms and mlp; base @1024 at the recipe's micro-batch (98,304 tokens); large
#          @1024 at the recipe's workload (11 micro-batches of 57,344 tokens per optimizer step); then
#          real pretraining runs of configs/modernbert-base.yaml on the embedded shards (data/shards, carried along:
#          `tools/bootstrap.sh main` makes them), 14 steps of the 1024 phase and 14 of the 8192 phase
#   GPU 1: transformers + torch.compile on the same workloads (tools/bench_hf.py): the ratios of one call
#   GPU 2: transformers' largest micro-batch at 8192 in 79.1 GiB (tools/hf_max_batch.py)
#   GPU 3: ours at each recompute level (tools/max_microbatch.sh)
# With fewer GPUs the jobs of the missing ones run after GPU 0's on GPU 0 (the ratios are still same-call). Logs go to
# $OUT (or /tmp); the summary is printed last. Usage: tools/gpu_perf.sh
set -u
root=$(pwd)
build="$root/${MB_GPU_BUILD:-build-cuda}"
binary="$build/modernbert"
out="${OUT:-/tmp}"
export MB_SOURCE_DIR="$root" LD_LIBRARY_PATH="$root/.devlib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
[[ -x $binary ]] || { echo "gpu_perf.sh: missing $binary (meson setup ${MB_GPU_BUILD:-build-cuda} && ninja -C ...)" >&2; exit 2; }
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
[[ $gpus -ge 1 ]] || { echo "gpu_perf.sh: no GPU" >&2; exit 2; }
workloads=("base --seq 1024" "base --seq 8192" "large --seq 1024")

hf_speed() {
    for args in "${workloads[@]}"; do
        python3 tools/bench_hf.py --model $args --tokens 32768 --steps 10 2>/dev/null | tail -1
    done > "$out/perf_hf.txt"
    python3 tools/bench_hf.py --model base --seq 1024 --tokens 98304 --steps 6 2>/dev/null | tail -1 >> "$out/perf_hf.txt"
}
hf_memory() { python3 tools/hf_max_batch.py --model base --seq 8192 --limit-gib 79.1 > "$out/perf_hf_max.txt" 2>&1; }
our_memory() {
    for level in none norms mlp; do
        MODERNBERT=$binary tools/max_microbatch.sh --model base --seq 8192 --limit-gib 79.1 --recompute $level \
            2>>"$out/perf_max.log" | tail -1
    done > "$out/perf_max.txt"
}
ours() {
    for seq in 1024 8192; do
        "$binary" bench attention --seq $seq 2>&1 | grep "^attention [fb]"
        "$binary" bench attention --seq $seq --rope 2>&1 | grep "^attention backward" # as training runs it
    done
    for args in "${workloads[@]}"; do # with the SM clock and power under load (the 700 W cap, docs/performance.md)
        tools/gpu_clocks.sh -- "$binary" bench train --backend cuda --model $args --tokens 32768 --steps 10 2>&1 |
            grep -E "step time|gpu_clocks" | sed "s/^/$args /"
    done
    for level in norms mlp; do
        "$binary" bench train --backend cuda --model base --seq 1024 --tokens 32768 --steps 10 --recompute $level \
            2>&1 | grep "step time" | sed "s/^/base --seq 1024, recompute $level /"
    done
    "$binary" bench train --backend cuda --model base --seq 1024 --tokens 98304 --steps 5 2>&1 | grep "step time" |
        sed "s/^/base --seq 1024, 98304 tokens /"
    # large at the recipe's workload per GPU on 8 GPUs: 11 micro-batches of 57,344 tokens per optimizer step
    "$binary" bench train --backend cuda --model large --seq 1024 --tokens 57344 --accumulate 11 --steps 2 2>&1 |
        grep "step time" | sed "s/^/large --seq 1024, 11 x 57344 tokens /"
    real_runs
} > "$out/perf_ours.txt"

# Real pretraining (session 10): the trainer's tokens/s per step, 14 steps of each phase of the base recipe (the 8192
# phase with 8 micro-batches per step, as the 1024 phase's batch-size warm-up has). Packing leaves most micro-batches
# short, so these see the varying token counts that `bench train` does not.
real_runs() {
    compgen -G "data/shards/train-*.mbs" > /dev/null ||
        { echo "real runs: skipped (no data/shards/train-*.mbs: run tools/bootstrap.sh main, carry data/shards)"; return; }
    local common="data.train=data/shards/train-*.mbs data.val=data/shards/val-*.mbs logging.every_steps=1
        logging.val_every_steps=100000 checkpoint.every_steps=100000 checkpoint.every_minutes=100000
        logging.progress_bar=false"
    local phase
    for phase in 1024 8192; do
        local extra=""
        [[ $phase == 8192 ]] && extra="phases.0.tokens=1 phases.1.batch_tokens=786432"
        rm -rf "/tmp/gpu_perf_run$phase"
        "$binary" pretrain configs/modernbert-base.yaml $common $extra run.output_dir="/tmp/gpu_perf_run$phase" \
            --max-steps 14 > "$out/perf_run$phase.log" 2>&1
        echo "real run, $phase phase, tokens/s of steps 1-14: $(grep -E '^step' "$out/perf_run$phase.log" |
            awk -F'|' '{print $7}' | tr -s ' ' | tr '\n' ' ')"
    done
}

pids=()
job_on() { # job_on GPU FUNCTION: in the background on that GPU when it exists
    local gpu=$1 job=$2
    if [[ $gpu -lt $gpus ]]; then (CUDA_VISIBLE_DEVICES=$gpu $job) & pids+=($!); else later+=("$job"); fi
}
later=()
job_on 1 hf_speed
job_on 2 hf_memory
job_on 3 our_memory
CUDA_VISIBLE_DEVICES=0 ours
for job in "${later[@]}"; do CUDA_VISIBLE_DEVICES=0 $job; done
wait "${pids[@]}"
echo "== $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $gpus GPU(s)"
cut -c1-160 "$out/perf_ours.txt"
cat "$out/perf_hf.txt" "$out/perf_max.txt"
tail -1 "$out/perf_hf_max.txt"
