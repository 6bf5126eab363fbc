#!/usr/bin/env python3
"""Summarize an ncu SASS-level CSV (`ncu -i REPORT --page source --csv --print-source sass`, written by
tools/ncu_attention.sh): the kernel's stall reasons, the instructions with the most stall samples, and the opcode mix
of the instructions executed exactly `--per` times (e.g. once per warp per loop step), so that a step's instruction
count can be read off. With --regions, the kernel cut at its synchronisation points (wgmma issue and waits, mbarrier
waits and arrivals, block barriers): the share of the stall samples between one point and the next, which is where a
loop step's time goes (session 5 found 27 % of a backward kernel's samples between two of them this way). Standard
library only; runs where the CSV was copied to.

Usage: tools/ncu_sass_summary.py FILE.csv [--top N] [--per COUNT] [--regions]
"""
import argparse
import collections
import csv
import sys

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def number(text):
    return float(text.replace(",", "")) if text else 0.0


def opcode(source):
    words = source.split()
    if not words:
        return ""
    word = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
    return word.split(".")[0]


def load(path):
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    header_row = next((i for i, row in enumerate(rows) if SAMPLES in row), None)
    if header_row is None:
        sys.exit(f"{path}: no '{SAMPLES}' column: not an ncu source-page CSV with SourceCounters")
    header = rows[header_row]
    return header, rows[header_row + 1:]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv")
    parser.add_argument("--top", type=int, default=25, help="instructions with the most samples to list")
    parser.add_argument("--per", type=float, default=0, help="executed count of one loop step (0: the most common)")
    parser.add_argument("--regions", action="store_true", help="stall samples between synchronisation points")
    options = parser.parse_args()
    header, data = load(options.csv)
    column = {name: i for i, name in enumerate(header)}
    reasons = [name for name in header if name.startswith("stall_") and "Not Issued" not in name]
    total = sum(number(row[column[SAMPLES]]) for row in data)
    executed = sum(number(row[column[EXECUTED]]) for row in data)
    print(f"{options.csv}: {len(data)} SASS instructions, {executed:.4g} warp instructions executed, "
          f"{total:.0f} stall samples")
    if total == 0:
        sys.exit("no samples: was the SourceCounters section collected?")
    by_reason = {name: sum(number(row[column[name]]) for row in data) for name in reasons}
    print("stall reasons: " + "  ".join(f"{name[6:]} {100 * value / total:.1f}%" for name, value in
                                         sorted(by_reason.items(), key=lambda item: -item[1]) if value / total > 0.005))
    top = sorted(range(len(data)), key=lambda i: -number(data[i][column[SAMPLES]]))[:options.top]
    for i in sorted(top):
        row = data[i]
        samples = number(row[column[SAMPLES]])
        main_reasons = sorted(((number(row[column[name]]), name[6:]) for name in reasons), reverse=True)[:2]
        reasons_text = " ".join(f"{name}:{100 * value / max(samples, 1):.0f}%" for value, name in main_reasons)
        print(f"{i:5d} {100 * samples / total:5.2f}% executed {row[column[EXECUTED]]:>10}  {row[1][:60]:<60} "
              f"{reasons_text}")
    counts = collections.Counter(number(row[column[EXECUTED]]) for row in data if number(row[column[EXECUTED]]) > 0)
    per = options.per or max(counts, key=lambda value: counts[value] * value)
    mix = collections.Counter(opcode(row[1]) for row in data if number(row[column[EXECUTED]]) == per)
    print(f"instructions executed {per:.0f} times (one loop step per warp): {sum(mix.values())}")
    print("  " + ", ".join(f"{name} {count}" for name, count in mix.most_common(30)))
    if options.regions:
        print_regions(data, column, total)


SYNC_OPCODES = ("HGMMA", "WARPGROUP", "SYNCS", "BAR", "UBLKRED", "UTMACMDFLUSH")


def print_regions(data, column, total):
    """Cuts the SASS at executed synchronisation instructions (runs of them form one cut) and prints each region's
    share of the stall samples with its first and last instruction: the region before a cut holds the waits for it."""
    print("stall samples by region (cut at executed wgmma / mbarrier / barrier / bulk instructions):")
    start, samples, previous_sync = 0, 0.0, False
    for i, row in enumerate(data):
        executed = number(row[column[EXECUTED]]) > 0
        is_sync = executed and opcode(row[1]) in SYNC_OPCODES
        if is_sync and not previous_sync and i > start:
            print_region(data, start, i - 1, samples, total)
            start, samples = i, 0.0
        samples += number(row[column[SAMPLES]])
        previous_sync = is_sync if executed else previous_sync
    print_region(data, start, len(data) - 1, samples, total)


def print_region(data, first, last, samples, total):
    if samples / total < 0.005:
        return
    print(f"  {first:5d}-{last:5d} {100 * samples / total:5.1f}%  {data[first][1].strip()[:44]:<44} .. "
          f"{data[last][1].strip()[:44]}")


if __name__ == "__main__":
    main()
