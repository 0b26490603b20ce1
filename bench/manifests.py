"""Reading a bulk manifest: rapidyaml (shared/ryml_yaml.py) against PyYAML with libyaml.

    .venv/bin/python bench/manifests.py [--services 20000] [--rounds 3]

The file is bench/lb.py's bulk: one Service and one EndpointSlice per service (9.4 MB for
20,000). Each round reads it with ``kube_yaml.load_all`` (what ``membrane apply -f`` does) and
with PyYAML's libyaml loader (kube_yaml's reading, the fallback), alternately; the best
round of each is printed with their ratio and the load average.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.lb import Plan
from shared import kube_yaml

_Dumper: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def timed(read: Any, text: str) -> tuple[float, list[Any]]:
    started = time.perf_counter()
    docs = read(text)
    return time.perf_counter() - started, docs


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--services", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    text = yaml.dump_all(Plan(5, args.services).documents(0, args.services), Dumper=_Dumper)
    ours: list[float] = []
    libyaml: list[float] = []
    for _ in range(args.rounds):
        seconds, docs = timed(lambda t: kube_yaml.load_all(t, "bulk.yaml"), text)
        ours.append(seconds)
        seconds, reference = timed(
            lambda t: list(yaml.load_all(t, Loader=kube_yaml._CLoader)), text
        )
        libyaml.append(seconds)
        if docs != reference:
            sys.exit("the two readings differ")
    print(
        f"reading {len(text) / 1e6:.1f} MB ({2 * args.services} documents), best of "
        f"{args.rounds}: kube_yaml (rapidyaml) {min(ours):.3f} s, PyYAML with libyaml "
        f"{min(libyaml):.3f} s ({min(libyaml) / min(ours):.1f}x); same documents; load "
        f"average {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
