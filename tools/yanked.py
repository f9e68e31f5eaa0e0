#!/usr/bin/env python3
"""Fail if Cargo.lock pins a crate version its authors have yanked from crates.io.

Yanking is how a crate's authors withdraw a broken or vulnerable release. RustSec's
advisory database lives on GitHub, which CI cannot reach; crates.io's sparse index
(https://doc.rust-lang.org/cargo/reference/registry-index.html) it can, and every
version's entry there says whether it is yanked. This is the part of the advisory
check that CI can make.

    python3 tools/yanked.py [Cargo.lock]
"""
import concurrent.futures
import json
import re
import sys
import urllib.request

CRATES_IO = "registry+https://github.com/rust-lang/crates.io-index"
INDEX = "https://index.crates.io"


def locked_packages(path):
    """(name, version) of every crates.io package in a Cargo.lock."""
    text = open(path, encoding="utf-8").read()
    out = []
    for block in text.split("[[package]]")[1:]:
        fields = dict(re.findall(r'^(name|version|source) = "([^"]*)"', block, re.M))
        if fields.get("source") == CRATES_IO:
            out.append((fields["name"], fields["version"]))
    return out


def index_path(name):
    # The sparse index's file layout, by the length of the (lower-case) name.
    n = name.lower()
    if len(n) <= 2:
        return f"{len(n)}/{n}"
    if len(n) == 3:
        return f"3/{n[0]}/{n}"
    return f"{n[:2]}/{n[2:4]}/{n}"


def yanked(pkg):
    name, version = pkg
    url = f"{INDEX}/{index_path(name)}"
    req = urllib.request.Request(url, headers={"User-Agent": "sdrs-audit (tools/yanked.py)"})
    with urllib.request.urlopen(req, timeout=30) as r:
        lines = r.read().decode("utf-8").splitlines()
    for line in lines:
        entry = json.loads(line)
        if entry["vers"] == version:
            return entry.get("yanked", False)
    raise LookupError(f"{name} {version} is not in the crates.io index ({url})")


def main():
    lock = sys.argv[1] if len(sys.argv) > 1 else "Cargo.lock"
    pkgs = locked_packages(lock)
    if not pkgs:
        sys.exit(f"yanked: no crates.io packages in {lock}")
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            flags = list(pool.map(yanked, pkgs))
    except (LookupError, OSError, ValueError) as e:
        sys.exit(f"yanked: {lock}: {e}")
    bad = [f"{n} {v}" for (n, v), y in zip(pkgs, flags) if y]
    if bad:
        sys.exit(f"yanked: {lock} pins versions withdrawn from crates.io: {', '.join(bad)}")
    print(f"yanked: none of the {len(pkgs)} crates.io packages in {lock} is yanked")


if __name__ == "__main__":
    main()
