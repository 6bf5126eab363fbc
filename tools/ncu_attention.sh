#!/usr/bin/env bash
# Per-instruction stall samples of the attention kernels (the method behind session 4's round 3, docs/kernels/
# attention_wgmma*.md): one ncu report per kernel with the SourceCounters, WarpStateStats and InstructionStats
# sections, exported as a SASS-level CSV (stall reasons and executed counts per instruction) plus the details page.
# Run from the repository root on the GPU machine, binaries carried in as for tools/gpu_perf.sh; one GPU per kernel
# when there are four. Summarize each CSV here with tools/ncu_sass_summary.py.
# Usage: tools/ncu_attention.sh [modernbert binary]   (results in $OUT, or /tmp/ncu_attention)
set -u
binary=${1:-build-cuda/modernbert}
out=${OUT:-/tmp/ncu_attention}
mkdir -p "$out"
[[ -x $binary ]] || { echo "ncu_attention.sh: missing $binary" >&2; exit 2; }
ncu_sections="--section SourceCounters --section WarpStateStats --section InstructionStats --import-source no"
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
[[ $gpus -ge 1 ]] || { echo "ncu_attention.sh: no GPU" >&2; exit 2; }
profile() { # profile GPU NAME KERNEL_REGEX bench-attention-arguments...
    local gpu=$1 name=$2 regex=$3
    shift 3
    CUDA_VISIBLE_DEVICES=$gpu timeout 300 ncu --clock-control none $ncu_sections -k regex:"$regex" --launch-skip 1 \
        --launch-count 1 -o "/tmp/$name" "$binary" bench attention "$@" --iters 1 > "/tmp/$name.log" 2>&1
    ncu -i "/tmp/$name.ncu-rep" --page source --csv --print-source sass > "/tmp/$name.csv" 2> "/tmp/$name.err"
    ncu -i "/tmp/$name.ncu-rep" --page details --print-details all > "/tmp/${name}_details.txt" 2>&1
    tar czf "$out/$name.tgz" -C /tmp "$name.csv" "${name}_details.txt" "$name.log" "$name.err"
}
jobs=("bwd8192 wgmma_backward_kernel --seq 8192 --window -1" "fwd8192 wgmma_forward_persistent --seq 8192 --window -1"
      "bwd1024 wgmma_backward_kernel --seq 1024 --window -1" "bandbwd band_backward_centre --seq 1024 --window 64")
for k in "${!jobs[@]}"; do
    # shellcheck disable=SC2086 # the job strings are word lists
    profile $((k % gpus)) ${jobs[$k]} &
    if (( (k + 1) % gpus == 0 )); then wait; fi
done
wait
ls -la "$out"
