"""How long the model takes to start, for each text tower, side by side.

Each round starts a fresh Python process per text tower, in turn, and times what a starting
worker waits for: building the fused encoder from its profile (both towers' weights read and
fingerprinted, any cached graph loaded) and its warm-up (the first encodes). The interpreter's
own start and the imports are timed apart, as they are the same for both towers.

A tower's first use on a machine also writes its caches (the multilingual tower's expanded
weights, about 10 s); that first start is run before the rounds and reported on its own, so
the rounds time a start on a machine that has served before, as every restart is.

    .venv/bin/python -m bench.startup                  # MiniLM vs multilingual-e5-small, 3 rounds
    .venv/bin/python -m bench.startup --rounds 5 --towers all-minilm-l6-v2,multilingual-e5-small
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from bench.cli import summary

TOWERS = ("all-minilm-l6-v2", "multilingual-e5-small")

# Runs in the child: the imports, then the encoder's build and warm-up, each timed.
_CHILD = """
import json, sys, time
started = time.perf_counter()
from loupe.encoders.fused import FusedEncoder, ModelProfile
imported = time.perf_counter()
encoder = FusedEncoder.from_profile(ModelProfile(text_backbone=sys.argv[1]))
built = time.perf_counter()
encoder.warm_up()
warm = time.perf_counter()
print(json.dumps({"import_s": imported - started, "build_s": built - imported,
                  "warm_up_s": warm - built, "model_version": encoder.model_version}))
"""


def start_once(tower: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, tower], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"starting with {tower} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("--towers", default=",".join(TOWERS), help="text towers, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    towers = [t.strip() for t in args.towers.split(",") if t.strip()]
    for tower in towers:
        first = start_once(tower)
        print(
            f"first start with {tower}: build {first['build_s']:.2f} s, warm-up "
            f"{first['warm_up_s']:.2f} s (model {first['model_version']})",
            flush=True,
        )
    runs: dict[str, list[dict]] = {tower: [] for tower in towers}
    for n in range(args.rounds):
        for tower in towers:  # interleaved, so that the machine's noise falls on both
            run = start_once(tower)
            runs[tower].append(run)
            print(
                f"round {n + 1} {tower:24s} import {run['import_s']:.2f} s, build "
                f"{run['build_s']:.2f} s, warm-up {run['warm_up_s']:.2f} s",
                flush=True,
            )
    print("\nstart (build + warm-up), median over the rounds [min, max]:")
    starts = {}
    for tower, tower_runs in runs.items():
        totals = [r["build_s"] + r["warm_up_s"] for r in tower_runs]
        starts[tower] = statistics.median(totals)
        print(f"  {tower:24s} {starts[tower]:.2f} s [{min(totals):.2f}, {max(totals):.2f}]")
    if len(towers) > 1:
        base = starts[towers[0]]
        for tower in towers[1:]:
            print(f"  {tower} - {towers[0]}: {starts[tower] - base:+.2f} s")


if __name__ == "__main__":
    main()
