#!/usr/bin/env bash
# Runs a command while sampling one GPU's SM clock, power draw and clock-event (throttle) reasons with nvidia-smi
# every 100 ms, then prints one summary line of the samples taken under load (power above half the limit) to stderr.
# Why: a training step on an H200 runs at the card's 700 W power cap, ~6 % below the clock ncu's isolated kernels run
# at (docs/performance.md, session 6); this shows it for any benchmark.
#   tools/gpu_clocks.sh [--gpu N] [--log FILE] -- command [args...]
# The GPU defaults to the first entry of CUDA_VISIBLE_DEVICES (else 0). The command's exit status is returned.
set -u
gpu=""
log=""
while [[ $# -gt 0 ]]; do
    case $1 in
    --gpu) gpu=$2; shift 2 ;;
    --log) log=$2; shift 2 ;;
    --) shift; break ;;
    -h | --help) sed -n '2,7p' "$0" | cut -c3-; exit 0 ;;
    *) echo "gpu_clocks.sh: unknown option $1 (usage: tools/gpu_clocks.sh [--gpu N] [--log FILE] -- command ...)" >&2
       exit 2 ;;
    esac
done
[[ $# -ge 1 ]] || { echo "gpu_clocks.sh: no command given (usage: tools/gpu_clocks.sh [--gpu N] -- command ...)" >&2; exit 2; }
if [[ -z $gpu ]]; then
    first=${CUDA_VISIBLE_DEVICES:-0}
    first=${first%%,*}
    [[ $first =~ ^[0-9]+$ ]] && gpu=$first || gpu=0
fi
command -v nvidia-smi > /dev/null || { echo "gpu_clocks.sh: nvidia-smi not found; running without sampling" >&2; exec "$@"; }
[[ -n $log ]] || log=$(mktemp /tmp/gpu_clocks.XXXXXX)
fields=timestamp,clocks.sm,power.draw,power.limit
reasons=$(nvidia-smi --help-query-gpu 2>/dev/null | grep -o 'clocks_event_reasons.active\|clocks_throttle_reasons.active' | head -1)
nvidia-smi -i "$gpu" --query-gpu=$fields${reasons:+,$reasons} --format=csv,noheader,nounits -lms 100 > "$log" 2>&1 &
sampler=$!
"$@"
status=$?
kill $sampler 2> /dev/null
wait $sampler 2> /dev/null
# fields: timestamp, SM MHz, power W, limit W[, reasons bitmask]; reason 0x4 is the software power cap
awk -F', *' -v gpu="$gpu" -v logfile="$log" '
    $2 ~ /^[0-9.]+$/ && $3 ~ /^[0-9.]+$/ && $4 ~ /^[0-9.]+$/ {
        total++
        if ($3 > 0.5 * $4) {
            n++; clock += $2; power += $3; limit = $4
            if (min == "" || $2 < min) min = $2
            if ($2 > max) max = $2
            if (NF >= 5) { seen[$5]++; if (index("4567cdefCDEF", substr($5, length($5), 1)) > 0) capped++ }
        }
    }
    END {
        if (n == 0) { printf "gpu_clocks.sh: GPU %s: %d samples, none above half the power limit (log %s)\n", gpu, total, logfile; exit }
        r = ""; for (k in seen) r = r " " k ":" seen[k]
        printf "gpu_clocks.sh: GPU %s under load: %d of %d samples, SM clock mean %.0f MHz (%d-%d), power mean %.0f W of %.0f W, power-capped in %d; reasons%s (log %s)\n",
               gpu, n, total, clock / n, min, max, power / n, limit, capped, r, logfile
    }' "$log" >&2
exit $status
