#!/usr/bin/env python3
"""Check that a checkpoint written by modernbert.c loads in Hugging Face transformers as it is, and that
transformers computes the same loss on a batch as `modernbert check` did.

    python3 tools/hf_load_check.py CHECKPOINT_DIR BATCH.safetensors EXPECTED_LOSS [--tokenizer]

Loads CHECKPOINT_DIR with AutoModelForMaskedLM / AutoModelForSequenceClassification (per config.json), runs the
packed batch as a right-padded batch (eager attention, fp32), and prints both losses and their relative difference;
exits 1 if it exceeds 1e-4. With --tokenizer, also loads tokenizer.json from the checkpoint with
PreTrainedTokenizerFast and encodes a sentence.
"""
import json
import os
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForSequenceClassification


def padded(values, cu, fill):
    lengths = [int(cu[i + 1] - cu[i]) for i in range(len(cu) - 1)]
    out = torch.full((len(lengths), max(lengths)), fill, dtype=values.dtype)
    mask = torch.zeros((len(lengths), max(lengths)), dtype=torch.int64)
    for b, length in enumerate(lengths):
        out[b, :length] = values[cu[b]:cu[b] + length]
        mask[b, :length] = 1
    return out, mask


def main():
    if len(sys.argv) < 4:
        print(__doc__)
        return 2
    directory, batch_path, expected = sys.argv[1], sys.argv[2], float(sys.argv[3])
    config = AutoConfig.from_pretrained(directory)
    config._attn_implementation = "eager"
    classifier = "ModernBertForSequenceClassification" in (config.architectures or [])
    model_class = AutoModelForSequenceClassification if classifier else AutoModelForMaskedLM
    model = model_class.from_pretrained(directory, config=config, torch_dtype=torch.float32).eval()
    batch = load_file(batch_path)
    cu = batch["cu_seqlens"].long()
    ids, mask = padded(batch["input_ids"].long(), cu, config.pad_token_id)
    with torch.no_grad():
        if classifier:
            labels = batch["labels"]
            labels = labels.float() if config.num_labels == 1 else labels.long()
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
        else:
            labels, _ = padded(batch["labels"].long(), cu, -100)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    difference = abs(loss - expected) / max(abs(expected), 1e-12)
    print(json.dumps({"checkpoint": directory, "class": type(model).__name__, "transformers_loss": loss,
                      "modernbert_c_loss": expected, "relative_difference": difference}))
    if "--tokenizer" in sys.argv:
        from transformers import PreTrainedTokenizerFast
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=os.path.join(directory, "tokenizer.json"))
        print("tokenizer:", tokenizer("The cat sat on the mat.")["input_ids"])
    return 0 if difference < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
