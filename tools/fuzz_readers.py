"""A longer fuzzing run of the image, DICOM and CSV readers: tests/test_fuzz_readers.py with many more examples.

Usage (from the repository root): python tools/fuzz_readers.py [--examples 5000] [--seed 0]
Prints pytest's summary; any example that makes a reader fail other than with its own named error is shrunk by
hypothesis to a minimal file and shown.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from data_paths import ROOT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=5000, help="examples per property (default: 5000)")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed, for a reproducible run")
    args = parser.parse_args()
    env = {**os.environ, "BONEAGE_FUZZ_EXAMPLES": str(args.examples)}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fuzz_readers.py"]
    start = time.perf_counter()
    result = subprocess.run([*command, f"--hypothesis-seed={args.seed}"], cwd=ROOT, env=env)
    print(f"{args.examples} examples per property, seed {args.seed}: {time.perf_counter() - start:.0f} s")
    sys.exit(result.returncode)


if __name__ == "__main__":
    main()
