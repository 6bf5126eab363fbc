#!/usr/bin/env bash
# Downloads the GLUE benchmark and unpacks it as the GLUE download script (nyu-mll/GLUE-baselines,
# download_glue_data.py) lays it out, which is the layout `modernbert finetune/eval/glue` read:
#
#   DIR/CoLA/{train,dev,test}.tsv   DIR/SST-2/...   DIR/MRPC/...   DIR/QQP/...   DIR/STS-B/...
#   DIR/MNLI/{train,dev_matched,dev_mismatched,test_matched,test_mismatched}.tsv   DIR/QNLI/...   DIR/RTE/...
#   DIR/WNLI/...   DIR/diagnostic/diagnostic.tsv (AX)
#
# usage: tools/get_glue.sh [DIR] [TASK ...]     DIR defaults to glue_data; TASKs: CoLA SST MRPC QQP STS MNLI QNLI
#                                                RTE WNLI diagnostic (default: all)
#
# Needs internet access and curl (or wget), plus unzip (or python3). About 1 GB unpacked (MNLI and QQP are most).
# The archives come from the mirror the GLUE script uses (dl.fbaipublicfiles.com). GLUE does not host MRPC: its
# train/dev/test files are built here exactly as the GLUE script builds them, from the SentEval copy of the
# Microsoft Research Paraphrase Corpus (msr_paraphrase_{train,test}.txt) and GLUE's list of dev pairs
# (mrpc_dev_ids.tsv). Like the GLUE script, the header line of msr_paraphrase_train.txt, byte-order mark included,
# is copied into train.tsv and dev.tsv; the readers skip the mark. Each dataset has its own licence: see
# https://gluebenchmark.com/faq and the papers cited there before you redistribute anything.
set -euo pipefail

BASE=https://dl.fbaipublicfiles.com/glue/data
SENTEVAL=https://dl.fbaipublicfiles.com/senteval/senteval_data

dir=${1:-glue_data}
shift || true
tasks=("$@")
if [ ${#tasks[@]} -eq 0 ]; then tasks=(CoLA SST MRPC QQP STS MNLI QNLI RTE WNLI diagnostic); fi

fetch() {  # fetch URL FILE
    echo "  downloading $1"
    if command -v curl >/dev/null; then curl -fsSL --retry 3 -o "$2" "$1"
    elif command -v wget >/dev/null; then wget -q -O "$2" "$1"
    else echo "get_glue.sh: needs curl or wget" >&2; exit 1; fi
}

unpack() {  # unpack ZIP DIR
    if command -v unzip >/dev/null; then unzip -q -o "$1" -d "$2"
    else python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$1" "$2"; fi
}

archive_task() {  # archive_task ZIPNAME FOLDER: the zip unpacks into FOLDER (QQP-clean.zip into QQP, QNLIv2 into QNLI)
    local zip="$dir/$1"
    fetch "$BASE/$1" "$zip"
    unpack "$zip" "$dir"
    rm -f "$zip"
    rm -rf "$dir/__MACOSX"
    [ -f "$dir/$2/train.tsv" ] || { echo "get_glue.sh: $1 did not unpack into $dir/$2" >&2; exit 1; }
}

mrpc() {
    local out="$dir/MRPC"
    mkdir -p "$out"
    fetch "$SENTEVAL/msr_paraphrase_train.txt" "$out/msr_paraphrase_train.txt"
    fetch "$SENTEVAL/msr_paraphrase_test.txt" "$out/msr_paraphrase_test.txt"
    fetch "$BASE/mrpc_dev_ids.tsv" "$out/dev_ids.tsv"
    # test.tsv: a new header, then "index, #1 ID, #2 ID, #1 String, #2 String" (the label column dropped)
    awk -F'\t' 'BEGIN { OFS = "\t"; print "index\t#1 ID\t#2 ID\t#1 String\t#2 String" }
                NR > 1 { sub(/\r$/, ""); print NR - 2, $2, $3, $4, $5 }' \
        "$out/msr_paraphrase_test.txt" > "$out/test.tsv"
    # train.tsv / dev.tsv: the original header (with its byte-order mark), rows split by the dev id pairs
    awk -F'\t' -v train="$out/train.tsv" -v dev="$out/dev.tsv" '
        FNR == NR { sub(/\r$/, ""); is_dev[$1 "\t" $2] = 1; next }
        FNR == 1 { sub(/\r$/, ""); print > train; print > dev; next }
        { sub(/\r$/, ""); sub(/^[ \t]+/, ""); sub(/[ \t]+$/, "")
          line = $1 "\t" $2 "\t" $3 "\t" $4 "\t" $5
          if (($2 "\t" $3) in is_dev) print line > dev; else print line > train }' \
        "$out/dev_ids.tsv" "$out/msr_paraphrase_train.txt"
    rm -f "$out/msr_paraphrase_train.txt" "$out/msr_paraphrase_test.txt"
}

mkdir -p "$dir"
for task in "${tasks[@]}"; do
    echo "$task:"
    case "$task" in
        CoLA) archive_task CoLA.zip CoLA ;;
        SST|SST-2) archive_task SST-2.zip SST-2 ;;
        MRPC) mrpc ;;
        QQP) archive_task QQP-clean.zip QQP ;;
        STS|STS-B) archive_task STS-B.zip STS-B ;;
        MNLI) archive_task MNLI.zip MNLI ;;
        QNLI) archive_task QNLIv2.zip QNLI ;;
        RTE) archive_task RTE.zip RTE ;;
        WNLI) archive_task WNLI.zip WNLI ;;
        diagnostic|AX) mkdir -p "$dir/diagnostic"; fetch "$BASE/AX.tsv" "$dir/diagnostic/diagnostic.tsv" ;;
        *) echo "get_glue.sh: unknown task '$task'" >&2; exit 2 ;;
    esac
done
echo "GLUE is in $dir. Next: modernbert glue --data $dir --init CHECKPOINT   (docs/finetuning.md)"
