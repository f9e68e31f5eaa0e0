#!/usr/bin/env python3
"""Fail if Cargo.lock pins a crate version its authors have yanked from crates.io.

Yanking is how a crate's authors withdraw a broken or vulnerable release. RustSec's
advisory database lives on GitHub, which CI cannot reach; crates.io's sparse index
(https://doc.rust-lang.org/cargo/reference/registry-index.html) it can, and every
version's entry there says whether it is yanked. This is the part of the advisory
check that CI can make.

    python3 tools/yanked.py [LOCKFILE...]     (default: Cargo.lock)
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


def yanked_versions(name):
    """The yanked versions of one crate, from its index file (one JSON line a version)."""
    url = f"{INDEX}/{index_path(name)}"
    req = urllib.request.Request(url, headers={"User-Agent": "sdrs-audit (tools/yanked.py)"})
    with urllib.request.urlopen(req, timeout=30) as r:
        entries = [json.loads(line) for line in r.read().decode("utf-8").splitlines()]
    return {e["vers"]: e.get("yanked", False) for e in entries}, url


def main():
    locks = sys.argv[1:] or ["Cargo.lock"]
    pkgs = {lock: locked_packages(lock) for lock in locks}
    for lock, found in pkgs.items():
        if not found:
            sys.exit(f"yanked: no crates.io packages in {lock}")
    # Each crate's index file once, however many lock files and versions name it.
    names = sorted({n for found in pkgs.values() for n, _ in found})
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            index = dict(zip(names, pool.map(yanked_versions, names)))
    except (OSError, ValueError) as e:
        sys.exit(f"yanked: reading crates.io's index: {e}")
    for lock, found in pkgs.items():
        bad = []
        for n, v in found:
            versions, url = index[n]
            if v not in versions:
                sys.exit(f"yanked: {lock}: {n} {v} is not in the crates.io index ({url})")
            if versions[v]:
                bad.append(f"{n} {v}")
        if bad:
            sys.exit(f"yanked: {lock} pins versions withdrawn from crates.io: {', '.join(bad)}")
        print(f"yanked: none of the {len(found)} crates.io packages in {lock} is yanked")


if __name__ == "__main__":
    main()
