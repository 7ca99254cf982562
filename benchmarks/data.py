#!/usr/bin/env python3
"""Turn a directory of text files into byte-level train/validation/test token files.

Split rule (by file, deterministic, independent of the other files):
    h = sha256(relative path, '/'-separated, UTF-8)
    v = int(h[:8] big-endian) % 100
    v < 90 -> train, 90 <= v < 95 -> validation, v >= 95 -> test
so a file keeps its split when files are added to or removed from the corpus, and
no text of a validation/test file is ever seen in training.

Tokens are bytes (vocabulary 256). The files of a split are concatenated in sorted
relative-path order, each followed by one 0 byte (end-of-document; text files hold
no NUL bytes, files that do are skipped as binary). Each split is stored as a 1-D
uint8 ``.npy`` file.

Cache: the output goes to ``OUT/<key>/`` where ``key`` is a hash of the format
version, the split rule and the list of (relative path, size) of the selected
files; a second run over the same files only lists and stats them. ``OUT/<key>/``
holds ``train.npy``, ``validation.npy``, ``test.npy`` and ``meta.json`` (token
counts, file lists per split, source). Such a directory is self-contained: copy it
to another machine and pass it to ``benchmarks/convergence.py --data``.

    python benchmarks/data.py --source DIR --out DIR [--ext .txt]
    python benchmarks/data.py --fetch-python-doc --out DIR

``--fetch-python-doc`` obtains the reStructuredText sources of the Python 3.11
documentation (Debian package ``python3.11-doc``, files
``usr/share/doc/python3.11/html/_sources/**/*.txt``) with ``apt-get download`` and
``dpkg -x`` into a temporary directory (no install; needs apt, i.e. Debian/Ubuntu).
Pass ``--deb FILE`` to use an already downloaded ``.deb`` instead. Nothing is
downloaded by training or tests: they read the prepared ``.npy`` files.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np

FORMAT_VERSION = 1
SPLITS = ("train", "validation", "test")
SPLIT_PERCENT = (90, 5, 5)
EOD = 0  # end-of-document byte
PYTHON_DOC_PACKAGE = "python3.11-doc"
PYTHON_DOC_SOURCES = "usr/share/doc/python3.11/html/_sources"


def split_of(relpath: str) -> str:
    """The split of a file, from its relative path ('/'-separated)."""
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    v = int.from_bytes(digest[:8], "big") % 100
    if v < SPLIT_PERCENT[0]:
        return "train"
    if v < SPLIT_PERCENT[0] + SPLIT_PERCENT[1]:
        return "validation"
    return "test"


def list_files(source, extensions=None):
    """Sorted [(relative posix path, size)] of the regular files under source.

    Hidden files and directories (name starting with '.') are skipped. With
    ``extensions`` (e.g. ['.txt']) only files whose name ends with one of them.
    """
    source = pathlib.Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"source directory {source} does not exist")
    out = []
    for root, dirs, files in os.walk(source):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith("."):
                continue
            if extensions and not any(name.endswith(e) for e in extensions):
                continue
            path = pathlib.Path(root) / name
            if not path.is_file():
                continue
            out.append((path.relative_to(source).as_posix(), path.stat().st_size))
    out.sort()
    return out


def cache_key(files) -> str:
    h = hashlib.sha256()
    h.update(f"flora_ext-bytes-v{FORMAT_VERSION};split={SPLIT_PERCENT};eod={EOD}\n".encode())
    for rel, size in files:
        h.update(f"{rel}\0{size}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def prepare(source, out, extensions=None, verbose=False):
    """Prepare (or find in the cache) the token files of ``source``; returns their directory."""
    source = pathlib.Path(source)
    files = list_files(source, extensions)
    if not files:
        raise ValueError(f"no files found under {source}"
                         + (f" with extensions {extensions}" if extensions else ""))
    key = cache_key(files)
    target = pathlib.Path(out) / key
    if (target / "meta.json").is_file():
        if verbose:
            print(f"cached: {target}")
        return target
    parts = {s: [] for s in SPLITS}
    names = {s: [] for s in SPLITS}
    skipped = []
    for rel, _ in files:
        data = (source / rel).read_bytes()
        if b"\0" in data:
            skipped.append(rel)
            continue
        s = split_of(rel)
        parts[s].append(np.frombuffer(data, dtype=np.uint8))
        parts[s].append(np.array([EOD], dtype=np.uint8))
        names[s].append(rel)
    empty = [s for s in SPLITS if not names[s]]
    if empty:
        raise ValueError(f"split(s) {empty} got no files out of {len(files)} under {source}; "
                         "the by-file split needs a few dozen files at least")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
    try:
        counts = {}
        for s in SPLITS:
            arr = np.concatenate(parts[s])
            np.save(tmp / f"{s}.npy", arr)
            counts[s] = int(arr.size)
        meta = {
            "format_version": FORMAT_VERSION,
            "tokenizer": "bytes",
            "vocab_size": 256,
            "eod_token": EOD,
            "split_rule": "sha256(relpath)[:8] % 100: <90 train, <95 validation, else test",
            "source": str(source.resolve()),
            "key": key,
            "tokens": counts,
            "files": names,
            "skipped_binary": skipped,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            tmp.rename(target)
        except OSError:  # prepared concurrently by another process
            if not (target / "meta.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(f"prepared: {target}")
    return target


def load_splits(data_dir):
    """{split: torch uint8 tensor} from a directory written by prepare()."""
    import torch

    data_dir = pathlib.Path(data_dir)
    if not (data_dir / "meta.json").is_file():
        raise FileNotFoundError(f"{data_dir} holds no meta.json: not a prepared token directory "
                                "(run benchmarks/data.py --source DIR --out OUT first)")
    return {s: torch.from_numpy(np.load(data_dir / f"{s}.npy")) for s in SPLITS}


def read_meta(data_dir):
    return json.loads((pathlib.Path(data_dir) / "meta.json").read_text())


def fetch_python_doc(workdir, deb=None):
    """Extract python3.11-doc into workdir; returns the _sources directory."""
    workdir = pathlib.Path(workdir)
    if deb is None:
        if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
            raise SystemExit("--fetch-python-doc needs apt-get and dpkg (Debian/Ubuntu); "
                             "or pass --deb FILE, or --source DIR with your own text")
        r = subprocess.run(["apt-get", "download", PYTHON_DOC_PACKAGE], cwd=workdir)
        if r.returncode != 0:
            raise SystemExit(f"apt-get download {PYTHON_DOC_PACKAGE} failed; "
                             "try `apt-get update` first")
        debs = sorted(glob.glob(str(workdir / f"{PYTHON_DOC_PACKAGE}_*.deb")))
        if not debs:
            raise SystemExit(f"apt-get download left no {PYTHON_DOC_PACKAGE}_*.deb in {workdir}")
        deb = debs[-1]
    root = workdir / "root"
    subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    sources = root / PYTHON_DOC_SOURCES
    if not sources.is_dir():
        raise SystemExit(f"{deb} has no {PYTHON_DOC_SOURCES}")
    return sources


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--source", help="directory of text files (searched recursively)")
    src.add_argument("--fetch-python-doc", action="store_true",
                     help=f"use the .rst sources of Debian's {PYTHON_DOC_PACKAGE} (apt-get download)")
    p.add_argument("--deb", help=f"with --fetch-python-doc: an already downloaded {PYTHON_DOC_PACKAGE} .deb")
    p.add_argument("--out", required=True, help="cache directory; the tokens go to OUT/<key>/")
    p.add_argument("--ext", action="append",
                   help="only files ending with this (repeatable); default: all files "
                        "(.txt with --fetch-python-doc)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="flora-pydoc-") as tmp:
        if args.fetch_python_doc:
            source = fetch_python_doc(tmp, args.deb)
            ext = args.ext or [".txt"]
        else:
            source, ext = args.source, args.ext
        target = prepare(source, args.out, ext, verbose=True)
    meta = read_meta(target)
    for s in SPLITS:
        print(f"{s:>10}: {meta['tokens'][s]:>11,d} tokens  {len(meta['files'][s]):>5d} files")
    print(f"data dir: {target}")
    return target


if __name__ == "__main__":
    main()
