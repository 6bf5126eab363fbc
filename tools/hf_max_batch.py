#!/usr/bin/env python3
"""The largest micro-batch (sequences of --seq tokens) that transformers + torch.compile can train in --limit-gib of
device memory, on the workload of tools/bench_hf.py (ModernBertForMaskedLM, sdpa, bf16 autocast, fused AdamW, 30 %
labelled, no padding). For issue 6's "largest micro-batch that fits 80 GB" on a card of any size: on a larger card
the caching allocator is capped (torch.cuda.set_per_process_memory_fraction) so that the CUDA context plus
everything torch reserves stays under the limit — the same quantity `modernbert bench train` reports as device
memory in use (cudaMemGetInfo).

    python3 tools/hf_max_batch.py --model base --seq 8192 --limit-gib 79.1

Method: train steps at 1 and 2 sequences give the memory per sequence; the prediction is checked by a step at the
predicted count and, when it fits, at one more; the boundary moves one sequence at a time until a fit is followed by
an out-of-memory. Prints one JSON line: max_sequences, max_tokens, the device memory in use at that size, the trials.
"""
import argparse
import json

import torch
import torch._dynamo
from transformers import ModernBertConfig, ModernBertForMaskedLM

from bench_hf import SIZES

GIB = 2**30


def device_used():
    free, total = torch.cuda.mem_get_info()
    return total - free


def trial(step_model, optimizer, sequences, seq):
    """Two training steps at `sequences` × `seq` tokens; the peak device memory in use, or None on out-of-memory."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = device_used() - torch.cuda.memory_reserved()  # the context and anything outside torch's allocator
    try:
        ids = torch.randint(0, 50000, (sequences, seq), device="cuda")
        labels = torch.where(torch.rand(ids.shape, device="cuda") < 0.3, ids, torch.full_like(ids, -100))
        mask = torch.ones_like(ids)
        for _ in range(2):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = step_model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return base + torch.cuda.max_memory_reserved()
    except torch.OutOfMemoryError:
        optimizer.zero_grad(set_to_none=True)
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base", choices=sorted(SIZES))
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--limit-gib", type=float, default=79.1)
    parser.add_argument("--max-trials", type=int, default=8)
    args = parser.parse_args()
    torch._dynamo.config.cache_size_limit = 64  # one compile per batch shape
    free, total = torch.cuda.mem_get_info()
    context = total - free
    limit = args.limit_gib * GIB
    if limit < total:
        torch.cuda.set_per_process_memory_fraction((limit - context) / total)
    cfg = ModernBertConfig(vocab_size=50368, **SIZES[args.model])
    cfg.sparse_prediction = True
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = ModernBertForMaskedLM(cfg).cuda()
    step_model = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    trials = {}

    def run(sequences):
        used = trial(step_model, optimizer, sequences, args.seq)
        trials[sequences] = None if used is None else round(used / GIB, 2)
        print(f"  {sequences} × {args.seq}: " + ("out of memory" if used is None else f"{used / GIB:.2f} GiB"),
              flush=True)
        return used

    one, two = run(1), run(2)
    if one is None or two is None:
        raise SystemExit("hf_max_batch: two sequences do not fit; nothing to extrapolate")
    per_sequence = two - one
    guess = max(2, int((limit - (one - per_sequence)) // per_sequence))
    fits, fails = 2, None
    candidate = guess
    for _ in range(args.max_trials):
        if candidate in trials or candidate <= fits or (fails is not None and candidate >= fails):
            break
        if run(candidate) is None:
            fails = candidate
            candidate -= 1
        else:
            fits = candidate
            candidate += 1
        if fails is not None and fails == fits + 1:
            break
    print(json.dumps({"model": args.model, "seq": args.seq, "limit_gib": args.limit_gib,
                      "max_sequences": fits, "max_tokens": fits * args.seq, "confirmed_boundary": fails == fits + 1,
                      "per_sequence_gib": round(per_sequence / GIB, 3), "used_gib_at_max": trials.get(fits),
                      "trials": trials, "gpu": torch.cuda.get_device_name()}))


if __name__ == "__main__":
    main()
