#!/usr/bin/env python3
"""Hugging Face tokenizers' throughput on a text file, to compare with `modernbert bench tokenize`.

    python3 tools/bench_tokenizers_py.py --input FILE [--tokenizer data/tokenizer.json] [--threads N]

The file is cut into documents at newlines (empty lines skipped) and each document is encoded without special
tokens, exactly as `modernbert bench tokenize` does, so "tokens per pass" must match its number. Three runs, each in
its own process because tokenizers sizes its Rayon thread pool once per process:
  encode loop      Tokenizer.encode per document from Python (one thread, includes Python call overhead)
  encode_batch 1   Tokenizer.encode_batch on all documents with TOKENIZERS_PARALLELISM=false (one thread)
  encode_batch N   Tokenizer.encode_batch with RAYON_NUM_THREADS=N
Passes repeat until --min-seconds have elapsed, after one untimed warm-up pass. Prints MB/s and tokens/s.
"""
import argparse
import json
import os
import subprocess
import sys
import time


def read_documents(path):
    with open(path, "rb") as f:
        data = f.read()
    docs = [line for line in data.split(b"\n") if line]
    return [d.decode("utf-8", errors="replace") for d in docs], sum(len(d) for d in docs)


def child(args):
    import tokenizers
    tok = tokenizers.Tokenizer.from_file(args.tokenizer)
    docs, nbytes = read_documents(args.input)
    if args.mode == "loop":
        def one_pass():
            return sum(len(tok.encode(d, add_special_tokens=False).ids) for d in docs)
    else:
        def one_pass():
            return sum(len(e.ids) for e in tok.encode_batch(docs, add_special_tokens=False))
    tokens = one_pass()
    passes, start = 0, time.perf_counter()
    while True:
        if one_pass() != tokens:
            sys.exit("bench_tokenizers_py: token count changed between passes")
        passes += 1
        seconds = time.perf_counter() - start
        if seconds >= args.min_seconds:
            break
    print(json.dumps({"version": tokenizers.__version__, "tokens": tokens, "bytes": nbytes, "documents": len(docs),
                      "passes": passes, "seconds": seconds}))


def run_child(args, mode, threads):
    env = dict(os.environ)
    if threads == 1 and mode == "batch":
        env["TOKENIZERS_PARALLELISM"] = "false"
    else:
        env["TOKENIZERS_PARALLELISM"] = "true"
        env["RAYON_NUM_THREADS"] = env["RAYON_RS_NUM_CPUS"] = str(threads)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--input", args.input, "--tokenizer",
           args.tokenizer, "--min-seconds", str(args.min_seconds)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"bench_tokenizers_py: {mode} run failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="text file")
    parser.add_argument("--tokenizer", default="data/tokenizer.json")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--child", choices=["loop", "batch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.mode = args.child
        return child(args)
    runs = [("encode loop", "loop", 1), ("encode_batch", "batch", 1)]
    if args.threads > 1:
        runs.append(("encode_batch", "batch", args.threads))
    results = [(label, threads, run_child(args, mode, threads)) for label, mode, threads in runs]
    first = results[0][2]
    print(f"tokenizers {first['version']} ({args.tokenizer})")
    print(f"input      {args.input} ({first['bytes'] / 1e6:.2f} MB in {first['documents']} documents)")
    for label, threads, r in results:
        mb = r["bytes"] * r["passes"] / 1e6
        tokens = r["tokens"] * r["passes"]
        print(f"{label:<13} {threads:3d} thread{'s' if threads > 1 else ' '}  {mb / r['seconds']:8.2f} MB/s  "
              f"{tokens / r['seconds'] / 1e6:8.3f} M tokens/s   ({r['passes']} passes, {r['seconds']:.2f} s)")
        if r["tokens"] != first["tokens"]:
            sys.exit(f"bench_tokenizers_py: {label} with {threads} threads gave {r['tokens']} tokens per pass, "
                     f"expected {first['tokens']}")
    print(f"{first['tokens']} tokens per pass, {first['bytes'] / first['tokens']:.2f} bytes per token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
