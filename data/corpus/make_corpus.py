#!/usr/bin/env python3
"""Rebuilds the embedded corpus (data/corpus/*.jsonl.zst) from Debian packages.

Each output file is zstd-compressed JSONL: one JSON object per line, {"id": "...", "text": "..."}, one document per
line (a novel's chapter, one documentation page, one source file). `modernbert tokenize --format jsonl` reads them
as they are (it decompresses .zst inputs itself).

Usage (Debian bookworm, root or any user who can run apt-get download; needs the zstd command):
    python3 data/corpus/make_corpus.py [--work /tmp/corpus-build] [--out data/corpus]

Every input is downloaded with `apt-get download` and unpacked with `dpkg -x`, so the versions are whatever the
archive holds today; data/README.md records the versions the committed files were built from. Only the standard
library is used: the Jane Austen novels ship as R lazy-load data, so a minimal reader of R's XDR serialization
format (enough for character vectors and lists) is included below.
"""
import argparse
import glob
import json
import os
import re
import struct
import subprocess
import sys
import tarfile
import zlib

PACKAGES = ["r-cran-janeaustenr", "python3.11-doc", "libpython3.11-stdlib", "glibc-source"]

GLIBC_DIRS = ["string", "stdlib", "malloc", "libio", "time", "stdio-common"]
PY_DOC_DIRS = ["tutorial", "reference", "howto", "faq", "extending", "using", "library"]
PY_DOC_MAX_BYTES = 5_000_000  # keeps python-docs.jsonl.zst near 1.3 MB
PY_STDLIB_SKIP = ("test/", "pydoc_data/", "idlelib/", "lib2to3/", "_sysconfigdata")


# ---------------------------------------------------------------------------------------------------------------
# A minimal R unserializer (R Internals §1.8 "Serialization formats", XDR big-endian, versions 2 and 3).
class RReader:
    def __init__(self, data):
        self.data = data
        self.pos = 0
        self.refs = []

    def int(self):
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def length(self):
        n = self.int()
        if n == -1:
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def header(self):
        if self.data[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.pos = 2
        version = self.int()
        self.int()
        self.int()
        if version == 3:
            n = self.int()
            self.pos += n

    def item(self):
        flags = self.int()
        kind = flags & 0xFF
        has_attr = flags & (1 << 9)
        has_tag = flags & (1 << 10)
        if kind == 254:  # NILVALUE_SXP
            return None
        if kind in (242, 241, 253, 252, 251, 250):  # empty/base/global env, unbound, missing, base namespace
            return None
        if kind == 255:  # REFSXP
            index = flags >> 8
            if index == 0:
                index = self.int()
            return self.refs[index - 1]
        if kind == 1:  # SYMSXP
            name = self.item()
            self.refs.append(name)
            return name
        if kind in (2, 3, 5, 6, 17):  # pairlists and friends: [attr] [tag] CAR CDR, CDR a pairlist or NULL
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            car = self.item()
            cdr = self.item()
            out = {tag: car}
            if isinstance(cdr, dict):
                out.update(cdr)
            return out
        if kind == 4:  # ENVSXP
            self.int()
            env = {}
            self.refs.append(env)
            self.item()
            frame = self.item()
            hashtab = self.item()
            self.item()
            if isinstance(frame, dict):
                env.update(frame)
            if isinstance(hashtab, list):
                for bucket in hashtab:
                    if isinstance(bucket, dict):
                        env.update(bucket)
            return env
        if kind == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            raw = self.data[self.pos:self.pos + n]
            self.pos += n
            return raw.decode("utf-8", errors="replace")
        if kind in (10, 13):  # LGLSXP, INTSXP
            n = self.length()
            value = list(struct.unpack_from(">%di" % n, self.data, self.pos))
            self.pos += 4 * n
        elif kind == 14:  # REALSXP
            n = self.length()
            value = list(struct.unpack_from(">%dd" % n, self.data, self.pos))
            self.pos += 8 * n
        elif kind == 16:  # STRSXP
            n = self.length()
            value = [self.item() for _ in range(n)]
        elif kind in (19, 20):  # VECSXP, EXPRSXP
            n = self.length()
            value = [self.item() for _ in range(n)]
        elif kind == 24:  # RAWSXP
            n = self.length()
            value = self.data[self.pos:self.pos + n]
            self.pos += n
        else:
            raise ValueError("unsupported R SEXP type %d at byte %d" % (kind, self.pos))
        if has_attr:
            attrs = self.item()
            if isinstance(attrs, dict) and "names" in attrs and isinstance(value, list):
                return dict(zip(attrs["names"], value))
        return value


def r_unserialize(data):
    reader = RReader(data)
    reader.header()
    return reader.item()


def read_lazyload(rdx_path):
    """Returns {name: value} for every object of an R lazy-load database (X.rdx + X.rdb)."""
    with open(rdx_path, "rb") as f:
        index = r_unserialize(zlib.decompress(f.read(), 15 + 32))
    with open(rdx_path[:-1] + "b", "rb") as f:
        rdb = f.read()
    objects = {}
    for name, (offset, length) in index["variables"].items():
        chunk = rdb[int(offset):int(offset) + int(length)]
        (raw_length,) = struct.unpack(">I", chunk[:4])
        body = zlib.decompress(chunk[4:])
        assert len(body) == raw_length, name
        objects[name] = r_unserialize(body)
    return objects


# ---------------------------------------------------------------------------------------------------------------
def run(cmd, cwd=None):
    subprocess.run(cmd, check=True, cwd=cwd)


def fetch(work):
    os.makedirs(work, exist_ok=True)
    run(["apt-get", "download"] + PACKAGES, cwd=work)
    versions = {}
    for deb in sorted(glob.glob(os.path.join(work, "*.deb"))):
        name, version = os.path.basename(deb).split("_")[:2]
        target = os.path.join(work, "x_" + name)
        if not os.path.isdir(target):
            run(["dpkg", "-x", deb, target])
        versions[name] = version.replace("%3a", ":")
    return versions


def write_jsonl_zst(path, documents):
    """documents: iterable of (id, text). Writes JSONL through `zstd -19 --long`."""
    payload = "".join(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n" for doc_id, text in documents)
    raw = payload.encode("utf-8")
    compressed = subprocess.run(["zstd", "-19", "--long=24", "-q", "-c"], input=raw, check=True,
                                capture_output=True).stdout
    with open(path + ".tmp", "wb") as f:
        f.write(compressed)
    os.replace(path + ".tmp", path)
    print("%-40s %5d docs %9d bytes of text -> %8d bytes" % (path, payload.count("\n"), len(raw), len(compressed)))


CHAPTER = re.compile(r"^(CHAPTER|Chapter)\s+([0-9IVXLC]+)\.?\s*$")


def austen_documents(work):
    rdx = glob.glob(os.path.join(work, "x_r-cran-janeaustenr", "usr/lib/R/site-library/janeaustenr/data/Rdata.rdx"))[0]
    books = read_lazyload(rdx)
    titles = {"sensesensibility": "sense-and-sensibility", "prideprejudice": "pride-and-prejudice",
              "mansfieldpark": "mansfield-park", "emma": "emma", "northangerabbey": "northanger-abbey",
              "persuasion": "persuasion"}
    for key, title in titles.items():
        lines = [line if line is not None else "" for line in books[key]]
        chapters, current, number = [], [], 0
        for line in lines:
            if CHAPTER.match(line.strip()):
                if any(x.strip() for x in current):
                    chapters.append((number, current))
                current, number = [line.strip()], number + 1
            else:
                current.append(line)
        if any(x.strip() for x in current):
            chapters.append((number, current))
        for number, chapter in chapters:
            # Unwrap the hard-wrapped paragraphs: lines of a paragraph join with a space, paragraphs with "\n\n".
            paragraphs, para = [], []
            for line in chapter:
                if line.strip():
                    para.append(line.strip())
                elif para:
                    paragraphs.append(" ".join(para))
                    para = []
            if para:
                paragraphs.append(" ".join(para))
            label = "front-matter" if number == 0 else "chapter-%02d" % number
            yield "austen/%s/%s" % (title, label), "\n\n".join(paragraphs)


def python_doc_documents(work):
    root = os.path.join(work, "x_python3.11-doc", "usr/share/doc/python3.11/html/_sources")
    total = 0
    for sub in PY_DOC_DIRS:
        for path in sorted(glob.glob(os.path.join(root, sub, "**", "*.rst.txt"), recursive=True)):
            with open(path, encoding="utf-8") as f:
                text = f.read()
            if total + len(text) > PY_DOC_MAX_BYTES:
                return
            total += len(text)
            yield "python-docs/" + os.path.relpath(path, root)[:-len(".txt")], text


def python_stdlib_documents(work):
    root = os.path.join(work, "x_libpython3.11-stdlib", "usr/lib/python3.11")
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        rel = os.path.relpath(path, root)
        if rel.startswith(PY_STDLIB_SKIP) or os.path.islink(path):
            continue
        with open(path, encoding="utf-8") as f:
            yield "cpython-3.11/Lib/" + rel, f.read()


def glibc_documents(work):
    tarball = glob.glob(os.path.join(work, "x_glibc-source", "usr/src/glibc", "glibc-*.tar.xz"))[0]
    wanted = []
    with tarfile.open(tarball) as tar:
        for member in tar:
            parts = member.name.split("/")
            if len(parts) == 3 and parts[1] in GLIBC_DIRS and member.isfile() and parts[2].endswith((".c", ".h")):
                text = tar.extractfile(member).read().decode("utf-8", errors="replace")
                # Only files that state the LGPL, so data/README.md's licence line holds for every one.
                if "GNU Lesser General Public" in text[:3000]:
                    wanted.append(("glibc-2.36/" + "/".join(parts[1:]), text))
    return sorted(wanted)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/corpus-build")
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = parser.parse_args()
    versions = fetch(args.work)
    os.makedirs(args.out, exist_ok=True)
    for name in PACKAGES:
        print("%s %s" % (name, versions.get(name, "?")))
    write_jsonl_zst(os.path.join(args.out, "austen.jsonl.zst"), austen_documents(args.work))
    write_jsonl_zst(os.path.join(args.out, "python-docs.jsonl.zst"), python_doc_documents(args.work))
    write_jsonl_zst(os.path.join(args.out, "python-stdlib.jsonl.zst"), python_stdlib_documents(args.work))
    write_jsonl_zst(os.path.join(args.out, "glibc.jsonl.zst"), glibc_documents(args.work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
