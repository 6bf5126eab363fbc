#!/usr/bin/env python3
"""transformers + torch.compile on the workload of `modernbert bench train`, so one GPU call yields both figures.

    python3 tools/bench_hf.py --model base --seq 1024 --tokens 32768 [--accumulate N] [--steps 10] [--no-compile]

Same model sizes and FLOP convention as modernbert.c (docs/performance.md): ModernBertForMaskedLM at random init,
`tokens / seq` documents of `seq` tokens each (a padded batch with no padding), 30 % of positions labelled
(sparse prediction), bf16 autocast, sdpa attention, fused AdamW; torch.compile unless --no-compile. A step is
--accumulate micro-batches of --tokens tokens (default 1: backward on the mean loss of each, gradients accumulated,
one optimizer step), as `bench train --accumulate`. Prints one JSON line with tokens/s, step time, model TFLOP/s and
peak memory (the method of ../shared/tools/anchor_hf.py).
"""
import argparse
import json
import time

import torch
from transformers import ModernBertConfig, ModernBertForMaskedLM

SIZES = {"base": dict(hidden_size=768, intermediate_size=1152, num_hidden_layers=22, num_attention_heads=12),
         "large": dict(hidden_size=1024, intermediate_size=2624, num_hidden_layers=28, num_attention_heads=16)}


def flops_per_token(cfg, seq):
    h, i, layers, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    matmuls = 6 * layers * (h * 3 * h + h * h + h * 2 * i + i * h)
    types = getattr(cfg, "layer_types", None) or [
        "full_attention" if layer % getattr(cfg, "global_attn_every_n_layers", 3) == 0 else "sliding_attention"
        for layer in range(layers)]
    attention = 0
    for kind in types:
        keys = seq if kind == "full_attention" else min(2 * (cfg.local_attention // 2) + 1, seq)
        attention += 12 * h * keys
    return matmuls + attention + 6 * (h * h + h * v) * 0.3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base", choices=sorted(SIZES))
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    if args.accumulate < 1 or args.tokens < args.seq or args.steps < 1:
        parser.error("need --accumulate >= 1, --tokens >= --seq, --steps >= 1")
    cfg = ModernBertConfig(vocab_size=50368, **SIZES[args.model])
    cfg.sparse_prediction = True
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = ModernBertForMaskedLM(cfg).cuda()
    step_model = model if args.no_compile else torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batch = args.tokens // args.seq
    micro_batches = []
    for _ in range(args.accumulate):
        ids = torch.randint(0, 50000, (batch, args.seq), device="cuda")
        labels = torch.where(torch.rand(ids.shape, device="cuda") < 0.3, ids, torch.full_like(ids, -100))
        micro_batches.append((ids, labels))
    mask = torch.ones_like(micro_batches[0][0])

    def step():
        # each micro-batch's mean loss / accumulate: the labels per micro-batch are about equal, so this is the
        # mean over the step's labels up to their spread, the usual accumulation in PyTorch training loops
        for ids, labels in micro_batches:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = step_model(input_ids=ids, attention_mask=mask, labels=labels).loss
            (loss / args.accumulate).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    tokens_per_second = batch * args.seq * args.accumulate / seconds
    print(json.dumps({"model": args.model, "seq": args.seq, "tokens_per_step": batch * args.seq * args.accumulate,
                      "accumulate": args.accumulate,
                      "compile": not args.no_compile, "step_s": round(seconds, 4),
                      "tokens_per_second": round(tokens_per_second),
                      "model_tflops": round(tokens_per_second * flops_per_token(cfg, args.seq) / 1e12, 1),
                      "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1), "loss": round(loss.item(), 4),
                      "gpu": torch.cuda.get_device_name()}))


if __name__ == "__main__":
    main()
