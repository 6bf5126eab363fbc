#!/usr/bin/env python3
"""Per-step kernel time by family from `ncu --metrics gpu__time_duration.sum --print-summary per-kernel` output.

Usage: tools/ncu_step_summary.py SUMMARY.txt [--steps N]
The bench runs warmup + timed steps under ncu (kernels serialized, one at a time), so every kernel's total
(average × invocations) is divided by the number of steps; N defaults to the number of optimizer steps seen
(invocations of adamw_params_kernel). Prints each family's ms per step and share, then the biggest kernels.
"""
import re
import signal
import sys

FAMILIES = [  # first match wins: (family, regex on the kernel name)
    ("GEMM (cuBLASLt nvjet + split-K reduce)", r"nvjet|splitKreduce|cublas|gemm|Gemm"),
    ("attention backward, global (wgmma)", r"wgmma_backward"),
    ("attention forward, global (wgmma)", r"wgmma_forward"),
    ("attention backward, local (band)", r"band_backward"),
    ("attention forward, local (band)", r"band_forward"),
    ("attention delta / dQ convert / tile plan", r"delta|dq_convert|convert_dq|tile_plan|attention"),
    ("LayerNorm", r"layernorm"),
    ("GeGLU", r"glu"),
    ("RoPE", r"rope"),
    ("loss / head", r"cross_entropy|mse|gather_rows|scatter|column_sum|bias|logit|sum_kernel"),
    ("optimizer", r"adamw|grad_norm|to_bf16"),
    ("embeddings", r"embedding|RadixSort|positions"),
]


def parse(path):
    kernels = []  # (name, invocations, average us)
    name, calls = None, 0
    header = re.compile(r"^  (\S.*) \(\d+, \d+, \d+\)x\(\d+, \d+, \d+\), .*Invocations (\d+)\s*$")
    metric = re.compile(r"gpu__time_duration\.sum\s+(\w+)\s+([\d.,]+)\s+([\d.,]+)\s+([\d.,]+)")
    for line in open(path, errors="replace"):
        m = header.match(line)
        if m:
            name, calls = m.group(1), int(m.group(2))
            continue
        m = metric.search(line)
        if m and name is not None:
            unit, avg = m.group(1), float(m.group(4).replace(",", ""))
            scale = {"ns": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6}.get(unit)
            if scale is None:
                sys.exit(f"{path}: unknown time unit {unit!r} for kernel {name}")
            kernels.append((name, calls, avg * scale))
            name = None
    if not kernels:
        sys.exit(f"{path}: no per-kernel gpu__time_duration.sum entries found")
    return kernels


def main():
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    kernels = parse(args[0])
    steps = None
    if "--steps" in args:
        steps = int(args[args.index("--steps") + 1])
    else:
        steps = sum(c for n, c, _ in kernels if "adamw_params" in n)
        if steps == 0:
            sys.exit(f"{args[0]}: no adamw_params_kernel invocations: pass --steps")
    totals, total = {}, 0.0
    for name, calls, avg in kernels:
        family = next((f for f, r in FAMILIES if re.search(r, name)), "other")
        us = calls * avg / steps
        totals[family] = totals.get(family, 0.0) + us
        total += us
    print(f"{args[0]}: {steps} steps, {total / 1e3:.2f} ms of kernels per step")
    for family, us in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {us / 1e3:8.2f} ms  {100 * us / total:5.1f} %  {family}")
    print("largest kernels (ms per step, calls per step):")
    for name, calls, avg in sorted(kernels, key=lambda k: -k[1] * k[2])[:15]:
        print(f"  {calls * avg / steps / 1e3:8.3f}  {calls / steps:6.1f}  {name[:110]}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` ends the output quietly
    sys.exit(main())
