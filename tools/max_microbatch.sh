#!/usr/bin/env bash
# The largest micro-batch (sequences of SEQ tokens) that modernbert.c trains within LIMIT GiB of device memory — the
# counterpart of tools/hf_max_batch.py for issue 6's "largest micro-batch that fits 80 GB". Each trial is one
# `modernbert bench train` (a warm-up step and a timed step); its "peak" is the device memory in use (cudaMemGetInfo:
# context, state, activations, library workspaces), which must stay at or under the limit. On a card larger than the
# limit a trial above it still runs; it just does not count as fitting.
#
#   tools/max_microbatch.sh [--model base] [--seq 8192] [--limit-gib 79.1] [--recompute none|norms|mlp]
set -euo pipefail
model=base seq=8192 limit=79.1 recompute=none
binary=${MODERNBERT:-build/modernbert}
while [[ $# -gt 0 ]]; do
  case $1 in
    --model) model=$2; shift 2 ;;
    --seq) seq=$2; shift 2 ;;
    --limit-gib) limit=$2; shift 2 ;;
    --recompute) recompute=$2; shift 2 ;;
    -h|--help) sed -n 2,8p "$0"; exit 0 ;;
    *) echo "max_microbatch.sh: unknown option $1" >&2; exit 2 ;;
  esac
done

declare -A peak_of
# Prints the peak GiB of a training step at $1 sequences, or "oom".
trial() {
  local sequences=$1 out
  if out=$("$binary" bench train --backend cuda --model "$model" --seq "$seq" --tokens $((sequences * seq)) \
             --steps 1 --recompute "$recompute" 2>&1); then
    sed -n 's/.*peak \([0-9.]*\) GiB.*/\1/p' <<<"$out" | tail -1
  else
    grep -q -i "memory" <<<"$out" || { echo "max_microbatch.sh: trial at $sequences failed: $out" >&2; exit 1; }
    echo oom
  fi
}
fits_limit() { [[ $1 != oom ]] && awk -v p="$1" -v l="$limit" 'BEGIN { exit !(p <= l) }'; }
run() {
  local p; p=$(trial "$1"); peak_of[$1]=$p
  echo "  $1 × $seq: ${p}$([[ $p == oom ]] || echo " GiB")" >&2
}

run 1; run 2
if ! fits_limit "${peak_of[2]}"; then echo "max_microbatch.sh: 2 sequences do not fit" >&2; exit 1; fi
guess=$(awk -v a="${peak_of[1]}" -v b="${peak_of[2]}" -v l="$limit" 'BEGIN { s = b - a; g = int((l - (a - s)) / s); print (g < 2 ? 2 : g) }')
fits=2 fails=0 candidate=$guess
for _ in 1 2 3 4 5 6 7 8; do
  [[ -n ${peak_of[$candidate]:-} || $candidate -le $fits ]] && break
  [[ $fails -gt 0 && $candidate -ge $fails ]] && break
  run "$candidate"
  if fits_limit "${peak_of[$candidate]}"; then fits=$candidate; candidate=$((candidate + 1))
  else fails=$candidate; candidate=$((candidate - 1)); fi
  [[ $fails -eq $((fits + 1)) ]] && break
done
echo "{\"model\": \"$model\", \"seq\": $seq, \"limit_gib\": $limit, \"recompute\": \"$recompute\", \"max_sequences\": $fits, \"max_tokens\": $((fits * seq)), \"confirmed_boundary\": $([[ $fails -eq $((fits + 1)) ]] && echo true || echo false), \"peak_gib_at_max\": ${peak_of[$fits]}}"
