#!/usr/bin/env python3
"""Parity fixtures for the C tokenizer (tests/data/test_tokenizer.c), written by Hugging Face `tokenizers`.

Run from the repository root, where the Python `tokenizers` package is installed (no network needed):

    python3 tools/tokenizer_fixtures.py

It writes only under tests/fixtures/tokenizer/:
  1. tiny_legacy.json and tiny_pairs.json: two small byte-level BPE tokenizers built here with the standard library
     (a tiny BPE trained on the inputs) that exercise what data/tokenizer.json does not: legacy "a b" merges with a
     "#version" line, merges as pairs, added tokens with lstrip / rstrip / single_word / normalized variations (a
     normalized one that NFD input matches after NFC), an added token that is already in the model vocabulary, unk with
     fuse_unk, bytes missing from the vocabulary without unk (dropped), ignore_merges, add_prefix_space, a
     pre-tokenizer Sequence [Split(GPT-2), ByteLevel(use_regex=false)], RobertaProcessing, a post-processor Sequence
     with a TemplateProcessing whose special token has two ids;
  2. expected_<name>.json for data/tokenizer.json (name "shipped") and the two tiny tokenizers: for every file in
     inputs/ (read as bytes, decoded with errors='replace'): ids without special tokens, ids with the single
     template, the decode of those (with and without skip_special_tokens); ids of every pair (input i, input i+1);
     the id of every added token.
`--tokenizers-only` does step 1 alone and needs only the standard library. `--node-modules DIR` computes step 2 with
the Node.js binding of the same Rust library instead of the Python package (`npm install tokenizers` in some folder,
then pass its node_modules; that is how the first fixtures were made, with tokenizers 0.23.2). Prints a summary.
"""
import argparse
import collections
import json
import os
import re
import sys
import unicodedata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "tokenizer")
INPUTS = os.path.join(FIXTURES, "inputs")
SHIPPED = os.path.join(ROOT, "data", "tokenizer.json")
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


# ---- the byte-level alphabet (GPT-2 bytes_to_unicode) ---------------------------------------------------------------

def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


BYTE_CHAR = bytes_to_unicode()


# ---- inputs ---------------------------------------------------------------------------------------------------------

def read_inputs():
    names = sorted(os.listdir(INPUTS))
    texts = []
    for name in names:
        with open(os.path.join(INPUTS, name), "rb") as f:
            texts.append((name, f.read().decode("utf-8", errors="replace")))
    return texts


# ---- a tiny BPE trainer (standard library) --------------------------------------------------------------------------

# Close enough to the GPT-2 split for choosing merges (the tokenizers below use the real pattern).
TRAIN_SPLIT = re.compile(r"'(?:s|t|re|ve|m|ll|d)| ?[^\W\d_]+| ?\d+| ?[^\s\w]+|\s+(?!\S)|\s+")


def train_bpe(corpus, merge_count, missing_bytes):
    """Returns merges [(a, b)] learned greedily (most frequent pair, ties by smallest pair) on the byte-level words."""
    missing = {BYTE_CHAR[b] for b in missing_bytes}
    words = collections.Counter()
    for text in corpus:
        for piece in TRAIN_SPLIT.findall(text):
            words[tuple(BYTE_CHAR[b] for b in piece.encode("utf-8"))] += 1
    merges = []
    for _ in range(merge_count):
        pairs = collections.Counter()
        for word, count in words.items():
            for a, b in zip(word, word[1:]):
                if a not in missing and b not in missing:
                    pairs[(a, b)] += count
        if not pairs:
            break
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merges.append(best)
        merged = collections.Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


def build_vocab(prefix_tokens, missing_bytes, merges):
    vocab = {}
    for token in prefix_tokens:
        vocab[token] = len(vocab)
    for b in range(256):
        if b not in missing_bytes:
            vocab.setdefault(BYTE_CHAR[b], len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return vocab


def assign_added_ids(vocab, added):
    """Ids as tokenizers' AddedVocabulary::add_tokens gives them (model id if present, else after the largest)."""
    ids, largest = {}, None
    for token in added:
        content = token["content"]
        if content in ids:
            token["id"] = ids[content]
            continue
        if content in vocab:
            new_id = vocab[content]
        elif largest is None:
            new_id = len(vocab)
        else:
            new_id = largest + 1 if largest >= len(vocab) else len(vocab)
        ids[content] = new_id
        largest = new_id if largest is None else max(largest, new_id)
        token["id"] = new_id
    return ids


def added(content, special=False, lstrip=False, rstrip=False, single_word=False, normalized=None):
    return {"id": None, "content": content, "single_word": single_word, "lstrip": lstrip, "rstrip": rstrip,
            "normalized": (not special) if normalized is None else normalized, "special": special}


def tiny_legacy(corpus):
    """NFC (in a Sequence), ByteLevel(add_prefix_space), legacy merges, unk with fuse_unk, RobertaProcessing."""
    missing = set(range(0xF0, 0xF5)) | set(range(0x98, 0xA0))
    merges = train_bpe([unicodedata.normalize("NFC", t) for t in corpus], 400, missing)
    vocab = build_vocab(["<unk>"], missing, merges)
    tokens = [
        added("<unk>", special=True),
        added("<s>", special=True),
        added("</s>", special=True),
        added("<mask>", special=True, lstrip=True),
        added("  "),                                   # two spaces, normalized
        added("don", single_word=True),
        added("\u00e9"),                              # normalized: also matches the NFD "e\u0301" of the input
        added("[X]", lstrip=True, rstrip=True, normalized=False),
        added("\t\t", rstrip=True, normalized=False),
        added("ing"),                                  # also a model token: keeps the model id
    ]
    ids = assign_added_ids(vocab, tokens)
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": tokens,
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "NFC"}]},
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "post_processor": {"type": "RobertaProcessing", "sep": ["</s>", ids["</s>"]], "cls": ["<s>", ids["<s>"]],
                           "trim_offsets": True, "add_prefix_space": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]},
    }


def tiny_pairs(corpus):
    """No normalizer, Sequence [Split(GPT-2), ByteLevel(use_regex=false, add_prefix_space)], pair merges, no unk
    (bytes missing from the vocabulary vanish), ignore_merges, Sequence [ByteLevel, TemplateProcessing]."""
    missing = set(range(0xE4, 0xEA))
    merges = train_bpe(list(reversed(corpus)), 250, missing)
    vocab = build_vocab([], missing, merges)
    tokens = [
        added("<pad>", special=True),
        added("<cls>", special=True),
        added("<sep>", special=True),
        added("<mask>", special=True, lstrip=True, rstrip=True),
        added("   "),                                  # three spaces, normalized (no normalizer)
        added("++", single_word=True, normalized=False),
        added("ab", single_word=True, normalized=False),
        added("x", rstrip=True),
    ]
    ids = assign_added_ids(vocab, tokens)

    def special(name, type_id=0):
        return {"SpecialToken": {"id": name, "type_id": type_id}}

    def sequence(name, type_id=0):
        return {"Sequence": {"id": name, "type_id": type_id}}

    template = {
        "type": "TemplateProcessing",
        "single": [special("<cls>"), sequence("A"), special("<sep>")],
        "pair": [special("<cls>"), sequence("A"), special("<sep>"), sequence("B", 1), special("<sep>", 1)],
        "special_tokens": {
            "<cls>": {"id": "<cls>", "ids": [ids["<cls>"], ids["<pad>"]], "tokens": ["<cls>", "<pad>"]},
            "<sep>": {"id": "<sep>", "ids": [ids["<sep>"]], "tokens": ["<sep>"]},
        },
    }
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": tokens, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": GPT2_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": False}]},
        "post_processor": {"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}, template]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": [[a, b] for a, b in merges]},
    }


def write_json(path, value):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        json.dump(value, f, ensure_ascii=False, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def write_expected(path, value):
    """Like write_json, but one case / pair per line so that the id lists stay readable in diffs."""
    lines = ["{"]
    keys = list(value)
    for n, key in enumerate(keys):
        comma = "," if n + 1 < len(keys) else ""
        item = value[key]
        if isinstance(item, list):
            body = ",\n".join("  " + json.dumps(x, ensure_ascii=False) for x in item)
            lines.append(f" {json.dumps(key)}: [\n{body}\n ]{comma}")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(item, ensure_ascii=False)}{comma}")
    lines.append("}")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(lines) + "\n")
    json.loads("\n".join(lines))
    os.replace(tmp, path)


def write_tiny_tokenizers(texts):
    corpus = [text for _, text in texts]
    made = {}
    for name, build in (("tiny_legacy", tiny_legacy), ("tiny_pairs", tiny_pairs)):
        path = os.path.join(FIXTURES, name + ".json")
        spec = build(corpus)
        before = open(path, "rb").read() if os.path.exists(path) else None
        write_json(path, spec)
        state = "unchanged" if before == open(path, "rb").read() else "new or changed"
        made[name] = path
        print(f"wrote {os.path.relpath(path, ROOT)} ({state}): {len(spec['model']['vocab'])} model tokens, "
              f"{len(spec['model']['merges'])} merges, {len(spec['added_tokens'])} added tokens")
    return made


# ---- expected outputs (needs tokenizers) ----------------------------------------------------------------------------

def run_python(path, texts, pairs, added_contents):
    import tokenizers
    tok = tokenizers.Tokenizer.from_file(path)
    out = {"version": "python tokenizers " + tokenizers.__version__, "plain": [], "single": [], "pairs": [],
           "vocab_size_with_added": tok.get_vocab_size(with_added_tokens=True),
           "added_token_ids": [tok.token_to_id(c) for c in added_contents]}
    for text in texts:
        plain, single = tok.encode(text, add_special_tokens=False).ids, tok.encode(text).ids
        out["plain"].append({"ids": plain, "decode": tok.decode(plain, skip_special_tokens=False)})
        out["single"].append({"ids": single, "decode": tok.decode(single, skip_special_tokens=False),
                              "decode_skip": tok.decode(single, skip_special_tokens=True)})
    out["pairs"] = [tok.encode(a, b).ids for a, b in pairs]
    return out


# The same through the Node.js binding of the same Rust library (npm package `tokenizers`), for machines where the
# Python package is missing: `npm install tokenizers` in some folder, then --node-modules FOLDER/node_modules.
NODE_SCRIPT = r"""
const { Tokenizer } = require(process.env.MB_TOKENIZERS_NODE);
const fs = require('fs');
(async () => {
  const req = JSON.parse(fs.readFileSync(0, 'utf8'));
  const tok = Tokenizer.fromFile(req.path);
  const version = require(process.env.MB_TOKENIZERS_NODE + '/package.json').version;
  const out = { version: 'node tokenizers ' + version, plain: [], single: [], pairs: [],
                vocab_size_with_added: tok.getVocabSize(true),
                added_token_ids: req.added.map((c) => tok.tokenToId(c)) };
  for (const text of req.texts) {
    const plain = (await tok.encode(text, null, { addSpecialTokens: false })).getIds();
    const single = (await tok.encode(text, null, { addSpecialTokens: true })).getIds();
    out.plain.push({ ids: plain, decode: await tok.decode(plain, false) });
    out.single.push({ ids: single, decode: await tok.decode(single, false),
                      decode_skip: await tok.decode(single, true) });
  }
  for (const [a, b] of req.pairs) out.pairs.push((await tok.encode(a, b, { addSpecialTokens: true })).getIds());
  process.stdout.write(JSON.stringify(out));
})().catch((e) => { console.error(e); process.exit(1); });
"""


def run_node(node_modules, path, texts, pairs, added_contents):
    import subprocess
    env = dict(os.environ, MB_TOKENIZERS_NODE=os.path.join(os.path.abspath(node_modules), "tokenizers"))
    request = json.dumps({"path": path, "texts": texts, "pairs": pairs, "added": added_contents})
    result = subprocess.run(["node", "-e", NODE_SCRIPT], input=request.encode("utf-8"), capture_output=True, env=env)
    if result.returncode != 0:
        sys.exit(f"tokenizer_fixtures: node failed on {path}:\n{result.stderr.decode(errors='replace')}")
    return json.loads(result.stdout.decode("utf-8"))


def expected_for(run, path, texts):
    with open(path, encoding="utf-8") as f:
        added_contents = [a["content"] for a in json.load(f)["added_tokens"]]
    files = [file for file, _ in texts]
    strings = [text for _, text in texts]
    pair_index = [(i, (i + 1) % len(texts)) for i in range(len(texts))]
    got = run(path, strings, [(strings[i], strings[j]) for i, j in pair_index], added_contents)
    cases = []
    for k, file in enumerate(files):
        cases.append({"file": file, "ids": got["plain"][k]["ids"], "single": got["single"][k]["ids"],
                      "decode": got["plain"][k]["decode"], "decode_single": got["single"][k]["decode"],
                      "decode_single_skip": got["single"][k]["decode_skip"]})
    pairs = [{"a": files[i], "b": files[j], "ids": ids} for (i, j), ids in zip(pair_index, got["pairs"])]
    return {
        "tokenizer": os.path.relpath(path, ROOT),
        "generated_by": got["version"],
        "vocab_size_with_added": got["vocab_size_with_added"],
        "added_token_ids": dict(zip(added_contents, got["added_token_ids"])),
        "cases": cases,
        "pairs": pairs,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizers-only", action="store_true",
                        help="only (re)write tiny_legacy.json and tiny_pairs.json (standard library only)")
    parser.add_argument("--node-modules", metavar="DIR",
                        help="use the Node.js binding in DIR/tokenizers instead of the Python package")
    args = parser.parse_args()
    texts = read_inputs()
    print(f"{len(texts)} inputs in {os.path.relpath(INPUTS, ROOT)}")
    made = write_tiny_tokenizers(texts)
    if args.tokenizers_only:
        return 0
    if args.node_modules:
        def run(*a):
            return run_node(args.node_modules, *a)
    else:
        try:
            import tokenizers  # noqa: F401
        except ImportError:
            sys.exit("tokenizer_fixtures: the Python package `tokenizers` is not installed "
                     "(use --node-modules or --tokenizers-only)")
        run = run_python
    targets = [("shipped", SHIPPED)] + sorted(made.items())
    for name, path in targets:
        expected = expected_for(run, path, texts)
        out = os.path.join(FIXTURES, f"expected_{name}.json")
        write_expected(out, expected)
        total = sum(len(c["ids"]) for c in expected["cases"])
        print(f"wrote {os.path.relpath(out, ROOT)}: {expected['generated_by']}, {len(expected['cases'])} inputs "
              f"({total} ids), {len(expected['pairs'])} pairs, vocab size with added "
              f"{expected['vocab_size_with_added']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
