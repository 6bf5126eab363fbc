#!/usr/bin/env python3
"""Compares the metrics.jsonl of runs that should follow the same global sample stream (tools/gpu_dist.sh).

usage: dist_compare.py REFERENCE.jsonl OTHER.jsonl [...] [--from-step K]
For each OTHER run, over the steps both logged (from K on): how many steps have the same batch digest (the sum of the
micro-batch digests of the global step: equal digests = the same sequences, masked the same way, whatever the number
of GPUs), the largest |loss difference| and the losses at a few steps. Exit status 1 if any digest differs."""
import json
import sys


def load(path):
    steps = {}
    with open(path) as handle:
        for line in handle:
            record = json.loads(line)
            if "step_loss" in record:
                steps[record["step"]] = record
    return steps


def main(argv):
    from_step = 0
    if "--from-step" in argv:
        index = argv.index("--from-step")
        from_step = int(argv[index + 1])
        del argv[index:index + 2]
    if len(argv) < 2:
        print(__doc__)
        return 2
    reference = load(argv[0])
    status = 0
    for path in argv[1:]:
        other = load(path)
        common = sorted(step for step in other if step in reference and step >= from_step)
        if not common:
            print(f"{path}: no step in common with {argv[0]}")
            status = 1
            continue
        same = sum(other[s]["batch_digest"] == reference[s]["batch_digest"] for s in common)
        worst = max(abs(other[s]["step_loss"] - reference[s]["step_loss"]) for s in common)
        worst_step = max(common, key=lambda s: abs(other[s]["step_loss"] - reference[s]["step_loss"]))
        picks = [common[0], common[len(common) // 4], common[len(common) // 2], common[-1]]
        shown = ", ".join(f"step {s}: {reference[s]['step_loss']:.4f} vs {other[s]['step_loss']:.4f}" for s in picks)
        world = other[common[0]].get("world_size", "?")
        print(f"{path} ({world} GPUs) vs {argv[0]} ({reference[common[0]].get('world_size', '?')} GPUs): "
              f"steps {common[0]}..{common[-1]}: identical batch digests {same}/{len(common)}, "
              f"max |loss difference| {worst:.5f} (step {worst_step}); {shown}")
        if same != len(common):
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
