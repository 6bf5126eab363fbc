#!/usr/bin/env bash
# Runs the CUDA tests on a GPU machine, from the repository root (steps chosen by MB_GPU_TEST_STEPS):
#   tests      $build/tests/gpu/test_gpu_ops --verbose     (full sizes: every kernel against the CPU reference)
#   memcheck   compute-sanitizer --tool memcheck  on the same tests with MB_GPU_TEST_SMALL=1 (reduced sizes)
#   racecheck  compute-sanitizer --tool racecheck on the same tests with MB_GPU_TEST_SMALL=1
#   model      $build/tests/gpu/test_gpu_model --verbose   (whole-model CUDA backend vs CPU backend and transformers)
#   model-memcheck  memcheck on test_gpu_model with MB_GPU_TEST_SMALL=1
#   check      modernbert check --device cuda on a fixture (output in $OUT/check_cuda.safetensors)
# The binaries are built elsewhere (`meson setup build-cuda && ninja -C build-cuda`; MB_GPU_BUILD names another build
# folder) and carried here with the shared libraries the GPU machine lacks (Criterion, zstd, yaml, utf8proc, cjson,
# OpenBLAS, ...) in .devlib/.
# Logs go to $OUT (or /tmp) as gpu_test_<step>.log; the last lines printed are a summary table.
# Usage: [MB_GPU_TEST_STEPS="tests memcheck racecheck"] tools/gpu_test.sh [extra Criterion arguments,
#        e.g. --filter 'gpu_ops/attention*']   (choose steps to fit a time limit per command)
set -u

root=$(pwd)
build="$root/${MB_GPU_BUILD:-build-cuda}"
binary="$build/tests/gpu/test_gpu_ops"
model_binary="$build/tests/gpu/test_gpu_model"
fixture="$root/tests/fixtures/hf/mlm_hd32_window_small_every2"
log_dir="${OUT:-/tmp}"
export MB_SOURCE_DIR="$root" # fixtures of this checkout (binaries may come from another)
export LD_LIBRARY_PATH="$root/.devlib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

if [ ! -x "$binary" ]; then
    echo "missing $binary: build it with 'meson setup ${MB_GPU_BUILD:-build-cuda} && ninja -C ${MB_GPU_BUILD:-build-cuda}' first" >&2
    exit 2
fi

sanitizer=$(command -v compute-sanitizer || true)
for candidate in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    if [ -z "$sanitizer" ] && [ -x "$candidate" ]; then sanitizer=$candidate; fi
done

echo "== device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -4
missing=$(ldd "$binary" "$build/modernbert" $([ -x "$model_binary" ] && echo "$model_binary") | grep "not found" || true)
if [ -n "$missing" ]; then
    echo "shared libraries not found (add them to .devlib):" >&2
    echo "$missing" >&2
    exit 2
fi

declare -a names results seconds

run_step() { # name, command...
    local name=$1
    shift
    local log="$log_dir/gpu_test_$name.log" start end status
    echo "== $name: $*"
    start=$(date +%s)
    "$@" >"$log" 2>&1
    status=$?
    end=$(date +%s)
    tail -n 40 "$log"
    if [ "$status" = 0 ] && grep -q "^\[SKIP\]" "$log"; then status=skipped; fi # on a GPU machine a skip is a failure
    names+=("$name")
    results+=("$status")
    seconds+=("$((end - start))")
}

steps=${MB_GPU_TEST_STEPS:-tests memcheck racecheck}
for step in $steps; do
    case $step in
    tests) # Criterion runs each test in its own process; -j1 keeps the output in order.
        run_step tests "$binary" --verbose -j1 "$@" ;;
    model)
        run_step model "$model_binary" --verbose -j1 "$@" ;;
    check)
        run_step check "$build/modernbert" check --model "$fixture" --batch "$fixture/batch.safetensors" --device cuda \
            --out "$log_dir/check_cuda.safetensors" ;;
    memcheck | racecheck | model-memcheck | model-racecheck)
        target=$binary
        tool=$step
        if [ "$step" = model-memcheck ]; then target=$model_binary; tool=memcheck; fi
        if [ "$step" = model-racecheck ]; then target=$model_binary; tool=racecheck; fi
        if [ -z "$sanitizer" ]; then
            echo "compute-sanitizer not found: $step skipped" >&2
            names+=("$step")
            results+=("missing")
            seconds+=("0")
            continue
        fi
        # racecheck: every GEMM through our own kernel (MB_GEMM_FALLBACK=1), since racecheck flags hazards inside
        # cuBLASLt's closed kernels (nvjet_sm90_*) that say nothing about our code
        fallback=0
        if [ "$tool" = racecheck ]; then fallback=1; fi
        run_step "$step" env MB_GPU_TEST_SMALL=1 MB_GEMM_FALLBACK=$fallback "$sanitizer" --tool "$tool" --target-processes all \
            --error-exitcode 99 "$target" -j1 "$@" ;;
    *)
        echo "unknown step '$step' (tests, memcheck, racecheck, model, model-memcheck, model-racecheck, check)" >&2
        exit 2 ;;
    esac
done

echo
echo "== summary (logs in $log_dir/gpu_test_*.log)"
printf '%-10s %-8s %s\n' step status seconds
failed=0
for i in "${!names[@]}"; do
    printf '%-10s %-8s %s\n' "${names[$i]}" "${results[$i]}" "${seconds[$i]}"
    if [ "${results[$i]}" != "0" ]; then failed=1; fi
done
grep -h "Synthesis" "$log_dir"/gpu_test_tests.log "$log_dir"/gpu_test_model.log 2>/dev/null
grep -h "ERROR SUMMARY\|RACECHECK SUMMARY" "$log_dir"/gpu_test_memcheck.log "$log_dir"/gpu_test_racecheck.log \
    "$log_dir"/gpu_test_model-memcheck.log "$log_dir"/gpu_test_model-racecheck.log 2>/dev/null | sort | uniq -c
exit $failed
