#!/usr/bin/env bash
# Multi-GPU demonstrations for data parallelism (issue 7, docs/distributed.md), run from the repository root on a
# machine with 2 or 4 GPUs, binaries built elsewhere (BUILD, default build-cbc) with their libraries in .devlib.
# Steps (MB_DIST_STEPS, default all):
#   curve    the same run (tiny model, 16 rows of 4096 tokens per step, 120 steps) on 1, 2 and 4 GPUs: every step's
#            batch digest and loss compared with the 1-GPU run (tools/dist_compare.py)
#   scaling  ModernBERT-base at 1024, 4 micro-batches of 32768 tokens per GPU per step, on 1 and on all GPUs:
#            tokens/s per GPU and the scaling efficiency
#   faults   with W = every GPU (2 or 4): (a) W torchrun-style workers, the last rank killed with SIGKILL: the others'
#            exit codes, messages and times; (b) rank 1 stopped (SIGSTOP, a hang): the others time out
#            (run.comm_timeout_seconds=20); (c) `--nproc-per-node W`, one worker killed: the launcher's exit code and
#            time; (d) SIGTERM to the launcher: every rank stops at the same step, one checkpoint, exit 0
#   elastic  checkpoint on W GPUs at step 60, resume on W/2 to step 80: batches and losses vs the 1-GPU run
#   nodes    two "nodes" of W/2 processes each on this host (NODE_RANK 0/1, loopback rendezvous) vs the W-GPU run
# Logs go to $OUT (or /tmp).
set -u
build=${BUILD:-build-cbc}
out=${OUT:-/tmp}
binary="$PWD/$build/modernbert"
export LD_LIBRARY_PATH="$PWD/.devlib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export NCCL_NVLS_ENABLE=0   # NVLink multicast stays off on shared machines
steps=${MB_DIST_STEPS:-"curve scaling faults elastic nodes"}
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
work=${MB_DIST_WORK:-$(mktemp -d)}
echo "== $gpus GPU(s): $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); work in $work"

if ! compgen -G "data/shards/train-*.mbs" >/dev/null; then
    "$binary" tokenize --output data/shards --val-fraction 0.02 --quiet --overwrite data/corpus/*.jsonl.zst || exit 1
fi

curve_args="configs/tiny.yaml phases.0.micro_batch_tokens=4096 phases.0.batch_tokens=65536 phases.0.tokens=20M
    phases.0.warmup_tokens=500K phases.0.lr=1e-3 logging.every_steps=1 logging.val_every_steps=0 checkpoint.every_steps=100000
    logging.progress_bar=false run.comm_timeout_seconds=60"
port=29600
since() { awk -v now="$(date +%s.%N)" -v then="$1" 'BEGIN { printf "%.1f", now - then }'; }
next_port() { port=$((port + 1)); echo $port; }

# launch DIR NPROC [extra args...]: the local launcher (one process when NPROC is 1)
launch() {
    local dir=$1 nproc=$2
    shift 2
    if [ "$nproc" = 1 ]; then
        # shellcheck disable=SC2086
        "$binary" pretrain $curve_args run.output_dir="$dir" "$@" >"$dir.log" 2>&1
    else
        # shellcheck disable=SC2086
        "$binary" pretrain --nproc-per-node "$nproc" --master-port "$(next_port)" $curve_args run.output_dir="$dir" \
            "$@" >"$dir.log" 2>&1
    fi
}

if [[ $steps == *curve* ]]; then
    echo "== curve: 120 steps on 1, 2, 4 GPUs (and 1 GPU again: the run-to-run noise of the atomic attention backward)"
    for n in 1 2 4 1b; do
        [ "${n%b}" -le "$gpus" ] || continue
        start=$(date +%s.%N)
        launch "$work/curve$n" "${n%b}" --max-steps 120
        echo "$n GPU(s): exit $? in $(since "$start") s; $(grep -m1 'ZeRO' "$work/curve$n.log" | grep -o 'ZeRO-1[^;)]*' | head -1)"
        tail -n 2 "$work/curve$n.log" | head -1
        cp "$work/curve$n/metrics.jsonl" "$out/curve$n.jsonl" 2>/dev/null
    done
    python3 tools/dist_compare.py "$work/curve1/metrics.jsonl" "$work/curve1b/metrics.jsonl" "$work"/curve[24]/metrics.jsonl
fi

if [[ $steps == *scaling* ]]; then
    echo "== scaling: ModernBERT-base, 1024-token sequences, 4 x 32768 tokens per GPU per step"
    for n in 1 "$gpus"; do
        rows=$((4 * n))
        base_args="model.preset=base phases.0.seq_len=1024 phases.0.micro_batch_tokens=32768
            phases.0.batch_tokens=$((rows * 32768)) phases.0.lr=5e-4 phases.0.warmup_tokens=0 logging.every_steps=2
            data.val="
        # shellcheck disable=SC2086
        launch "$work/scale$n" "$n" $base_args --max-steps 14
        echo "$n GPU(s): exit $?"
        python3 - "$work/scale$n/metrics.jsonl" "$n" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"step_loss"' in l]
window = [r for r in rows if r["step"] > 6]
tps = sum(r["tokens_per_second"] for r in window) / len(window)
n = int(sys.argv[2])
print(f"  steps 7..{rows[-1]['step']}: {tps:,.0f} tokens/s in all, {tps / n:,.0f} per GPU, MFU {window[-1]['mfu'] * 100:.1f}%")
open(f"/tmp/scale{n}.tps", "w").write(str(tps / n))
PY
    done
    python3 -c "
one = float(open('/tmp/scale1.tps').read()); many = float(open('/tmp/scale$gpus.tps').read())
print(f'scaling efficiency at $gpus GPUs: {100 * many / one:.1f}% (tokens/s per GPU, against 1 GPU)')"
fi

# wait_for_step LOG N: until rank 0 has logged step N (or 120 s)
wait_for_step() {
    for _ in $(seq 1200); do
        grep -q "^step *$2 " "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

# The fault, elastic and nodes checks use every GPU of the machine (2 or 4; more count as 4): `world` workers, the
# last of them the victim; the elastic resume goes from `world` GPUs to world/2, the two "nodes" get world/2 each.
world=$((gpus >= 4 ? 4 : gpus))
last=$((world - 1))
ranks_but() { seq 0 "$last" | grep -vx "$1"; } # every rank but $1

# workers NAME [extra args]: `world` torchrun-style workers in the background, pids in $pids
workers() {
    local name=$1 p
    shift
    p=$(next_port)
    pids=()
    for r in $(seq 0 "$last"); do
        # shellcheck disable=SC2086
        RANK=$r WORLD_SIZE=$world LOCAL_RANK=$r LOCAL_WORLD_SIZE=$world MASTER_ADDR=127.0.0.1 MASTER_PORT=$p \
            "$binary" pretrain $curve_args run.output_dir="$work/$name" "$@" >"$work/$name.$r.out" \
            2>"$work/$name.$r.err" &
        pids+=($!)
    done
}

if [[ $steps == *faults* ]] && [ "$gpus" -ge 2 ]; then
    echo "== faults (a): $world torchrun-style workers, rank $last killed with SIGKILL at step 20"
    workers kill
    wait_for_step "$work/kill.0.out" 20 || echo "rank 0 never reached step 20"
    kill -9 "${pids[$last]}"
    killed=$(date +%s.%N)
    for r in $(ranks_but "$last"); do
        wait "${pids[$r]}"
        code=$?
        echo "rank $r: exit $code after $(since "$killed") s: $(tail -n 1 "$work/kill.$r.err")"
    done
    wait "${pids[$last]}" 2>/dev/null

    echo "== faults (b): rank 1 hangs (SIGSTOP at step 20), run.comm_timeout_seconds=20"
    workers hang run.comm_timeout_seconds=20
    wait_for_step "$work/hang.0.out" 20 || echo "rank 0 never reached step 20"
    kill -STOP "${pids[1]}"
    stopped=$(date +%s.%N)
    for r in $(ranks_but 1); do
        wait "${pids[$r]}"
        code=$?
        echo "rank $r: exit $code after $(since "$stopped") s: $(tail -n 1 "$work/hang.$r.err")"
    done
    kill -9 "${pids[1]}"
    wait "${pids[1]}" 2>/dev/null

    echo "== faults (c): --nproc-per-node $world, one worker killed with SIGKILL at step 20"
    p=$(next_port)
    # shellcheck disable=SC2086
    "$binary" pretrain --nproc-per-node "$world" --master-port "$p" $curve_args run.output_dir="$work/launcher" \
        >"$work/launcher.out" 2>"$work/launcher.err" &
    launcher=$!
    wait_for_step "$work/launcher.out" 20 || echo "never reached step 20"
    victim=$(pgrep -P "$launcher" | tail -n 1)
    kill -9 "$victim"
    killed=$(date +%s.%N)
    wait "$launcher"
    code=$?
    echo "launcher: exit $code after $(since "$killed") s; workers left: $(pgrep -P "$launcher" | wc -l)"
    grep -E "launcher|rank" "$work/launcher.err" | head -8

    echo "== faults (d): --nproc-per-node $world, SIGTERM to the launcher at step 20 (a preemption): one agreed checkpoint"
    p=$(next_port)
    # shellcheck disable=SC2086
    "$binary" pretrain --nproc-per-node "$world" --master-port "$p" $curve_args run.output_dir="$work/preempt" \
        >"$work/preempt.out" 2>"$work/preempt.err" &
    launcher=$!
    wait_for_step "$work/preempt.out" 20 || echo "never reached step 20"
    kill -TERM "$launcher"
    signalled=$(date +%s.%N)
    wait "$launcher"
    code=$?
    echo "launcher: exit $code after $(since "$signalled") s; $(grep -E '^(stopping|checkpoint)' "$work/preempt.out" | tr '\n' ' ')"
fi

if [[ $steps == *elastic* ]] && [ "$gpus" -ge 2 ]; then
    half=$((world / 2))
    echo "== elastic: $world GPUs to step 60 (checkpoint), then $half GPU(s) from it to step 80"
    launch "$work/elastic" "$world" --max-steps 60
    echo "$world GPUs: exit $?; $(grep -m1 'checkpoint: ' "$work/elastic.log")"
    launch "$work/elastic" "$half" --resume --max-steps 80
    echo "$half GPU(s): exit $?; $(grep -m1 '^resume:' "$work/elastic.log")"
    python3 tools/dist_compare.py "$work/curve1/metrics.jsonl" "$work/elastic/metrics.jsonl" --from-step 61
    python3 tools/dist_compare.py "$work/curve$world/metrics.jsonl" "$work/elastic/metrics.jsonl" --from-step 61
fi

if [[ $steps == *nodes* ]] && [ "$gpus" -ge 2 ]; then
    per_node=$((world / 2))
    echo "== nodes: 2 nodes x $per_node process(es) on this host, NODE_RANK 0/1, rendezvous 127.0.0.1"
    p=$(next_port)
    for node in 0 1; do
        visible=$(seq -s, $((node * per_node)) $((node * per_node + per_node - 1)))
        # shellcheck disable=SC2086
        CUDA_VISIBLE_DEVICES=$visible NODE_RANK=$node NNODES=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$p \
            "$binary" pretrain --nproc-per-node "$per_node" $curve_args run.output_dir="$work/nodes" --max-steps 40 \
            >"$work/nodes.$node.log" 2>&1 &
    done
    wait
    grep -m2 -E "launcher|data parallel" "$work/nodes.0.log"
    python3 tools/dist_compare.py "$work/curve$world/metrics.jsonl" "$work/nodes/metrics.jsonl"
fi
cp "$work"/*.log "$work"/*.err "$work"/*.out "$out/" 2>/dev/null
true
