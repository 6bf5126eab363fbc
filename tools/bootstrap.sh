#!/usr/bin/env bash
# Set up a fresh Debian machine, build modernbert.c, and run either the main job or the whole test suite.
#
#   tools/bootstrap.sh main    install what is missing, build, pretrain the tiny demo model on the embedded corpus
#                              (runs/tiny-demo: checkpoints, metrics.jsonl, loss.png)
#   tools/bootstrap.sh test    install what is missing, build (with CUDA when nvcc exists), run every test, then
#                              rebuild with AddressSanitizer + UBSan and run the parser/corruption suites under it
#
# Needs root (or sudo) for apt-get. CUDA comes with the machine image (/usr/local/cuda); without nvcc the CUDA
# backend is skipped and GPU tests report that they were skipped.
set -euo pipefail
mode="${1:-test}"
cd "$(dirname "$0")/.."

packages=(meson ninja-build pkg-config gcc libc6-dev libzstd-dev zstd libyaml-dev libutf8proc-dev libcjson-dev
          libopenblas-dev libcriterion-dev gnuplot-nox)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
    echo "bootstrap: installing ${missing[*]}"
    sudo_cmd=""
    [[ $(id -u) -ne 0 ]] && sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
[[ -d /usr/local/cuda/bin ]] && export PATH="$PATH:/usr/local/cuda/bin"

configure() {  # configure <dir> [meson options...]
    local dir="$1"
    shift
    if [[ -f "$dir/build.ninja" ]]; then
        meson setup --reconfigure "$dir" "$@" >/dev/null
    else
        meson setup "$dir" "$@" >/dev/null
    fi
}

configure build
ninja -C build

case "$mode" in
main)
    # the embedded corpus becomes token shards on first use (about 6M tokens, a few seconds)
    if ! compgen -G "data/shards/train-*.mbs" >/dev/null; then
        build/modernbert tokenize --tokenizer data/tokenizer.json --output data/shards --val-fraction 0.02 \
            --overwrite data/corpus/*.jsonl.zst
    fi
    # pretrain the tiny demo model (GPU when available); a rerun continues from the newest checkpoint
    build/modernbert pretrain configs/tiny.yaml --resume
    build/modernbert plot runs/tiny-demo
    ;;
test)
    status=0
    meson test -C build --print-errorlogs --num-processes 2 | tee /tmp/modernbert-test.log || status=1
    configure build-sanitize -Dcuda=disabled -Db_sanitize=address,undefined -Db_lundef=false
    ninja -C build-sanitize
    ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
        meson test -C build-sanitize --suite parsers --print-errorlogs --num-processes 2 \
        | tee -a /tmp/modernbert-test.log || status=1
    # one closing line over both runs (meson prints "Ok: N" / "Fail: N" / "Skipped: N" per run)
    awk '/^Ok:/ {ok += $2} /^Fail:/ {fail += $2} /^Timeout:/ {fail += $2} /^Skipped:/ {skip += $2}
         END {printf "%d passed, %d failed, %d skipped\n", ok, fail, skip}' /tmp/modernbert-test.log
    exit $status
    ;;
*)
    echo "usage: tools/bootstrap.sh main|test" >&2
    exit 2
    ;;
esac
