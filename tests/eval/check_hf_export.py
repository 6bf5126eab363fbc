#!/usr/bin/env python3
"""Checks a checkpoint exported by `modernbert finetune` (OUTPUT/best/) in Hugging Face transformers: it loads with
AutoModelForSequenceClassification and the tokenizer.json next to it, has the id2label the task needs, and gives
the logits that modernbert.c recorded in OUTPUT/best/<split>_predictions.tsv for the same dev rows.

    python3 tests/eval/check_hf_export.py --model runs/spam-pretrained/best --data data/spam --task sst2 --split dev

Needs torch and transformers (>= 4.48, which has ModernBERT). Runs on the CPU in fp32, one example at a time (no
padding), with the reference (eager) attention. Exit status 0 when every logit agrees within --tolerance.
"""
import argparse
import csv
import json
import os
import sys

# The columns of the train/dev layout (src/data/glue.h): text a, text b (None), header or not.
LAYOUTS = {
    "cola": (3, None, False), "sst2": (0, None, True), "mrpc": (3, 4, True), "qqp": (3, 4, True),
    "stsb": (7, 8, True), "mnli": (8, 9, True), "qnli": (1, 2, True), "rte": (1, 2, True), "wnli": (1, 2, True),
}
FOLDERS = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "qqp": "QQP", "stsb": "STS-B", "mnli": "MNLI",
           "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI"}


def read_rows(path, task):
    a, b, header = LAYOUTS[task]
    need = max(a, b or 0) + 1
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if header:
        rows = rows[1:]
    return [(r[a], r[b] if b is not None else None) for r in rows if len(r) >= need]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the exported folder (OUTPUT/best)")
    parser.add_argument("--data", required=True, help="the task folder or GLUE root")
    parser.add_argument("--task", required=True, choices=sorted(LAYOUTS))
    parser.add_argument("--split", default="dev")
    parser.add_argument("--limit", type=int, default=64, help="rows to check (default 64)")
    parser.add_argument("--tolerance", type=float, default=2e-4)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast

    data = args.data
    if not os.path.exists(os.path.join(data, f"{args.split}.tsv")):
        data = os.path.join(data, FOLDERS[args.task])
    rows = read_rows(os.path.join(data, f"{args.split}.tsv"), args.task)
    with open(os.path.join(args.model, "finetune.json")) as f:
        max_length = json.load(f)["max_seq_len"]
    recorded = []
    with open(os.path.join(args.model, f"{args.split}_predictions.tsv")) as f:
        next(f)
        for line in f:
            fields = line.rstrip("\n").split("\t")
            recorded.append([float(x) for x in fields[3:]])
    if len(recorded) != len(rows):
        sys.exit(f"{len(recorded)} recorded predictions but {len(rows)} rows in the {args.split} file")

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=os.path.join(args.model, "tokenizer.json"),
                                        cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
                                        mask_token="[MASK]", unk_token="[UNK]")
    model = AutoModelForSequenceClassification.from_pretrained(args.model, attn_implementation="eager",
                                                               torch_dtype=torch.float32).eval()
    print(f"loaded {type(model).__name__}: num_labels {model.config.num_labels}, id2label {model.config.id2label}, "
          f"pooling {model.config.classifier_pooling}")
    worst = 0.0
    with torch.no_grad():
        for i, (a, b) in enumerate(rows[: args.limit]):
            encoded = tokenizer(a, b, truncation=True, max_length=max_length, return_tensors="pt")
            logits = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits[0]
            difference = max(abs(float(x) - y) for x, y in zip(logits, recorded[i]))
            worst = max(worst, difference)
            if difference > args.tolerance:
                print(f"row {i}: transformers {logits.tolist()} vs modernbert.c {recorded[i]}")
    checked = min(args.limit, len(rows))
    print(f"{checked} rows: largest logit difference {worst:.3g} (tolerance {args.tolerance:g})")
    sys.exit(0 if worst <= args.tolerance else 1)


if __name__ == "__main__":
    main()
