"""How long ``import attnedit`` takes in a fresh interpreter, and what it pulls in.

    python bench/import_time.py [--runs 10] [--out bench/results/import_time.json]

Each run starts a new Python process that imports attnedit and reports the wall time of the import and
whether torch / transformers were loaded; a second measurement times the first use of the public API
(``attnedit.EditRequest``, which loads ``attnedit.api`` and with it torch). Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

PROBE = """
import json, sys, time
t0 = time.perf_counter()
import attnedit
t1 = time.perf_counter()
heavy = {m: m in sys.modules for m in ("torch", "transformers", "numpy")}
attnedit.EditRequest
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "first_api_use_s": t2 - t1, "loaded_by_import": heavy}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("bench/results/import_time.json"))
    args = parser.parse_args()
    samples = []
    for _ in range(args.runs):
        out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
        samples.append(json.loads(out.stdout))
    result = {
        "command": f"python bench/import_time.py --runs {args.runs}",
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "runs": args.runs,
        "import_s_median": statistics.median(s["import_s"] for s in samples),
        "import_s_max": max(s["import_s"] for s in samples),
        "first_api_use_s_median": statistics.median(s["first_api_use_s"] for s in samples),
        "loaded_by_import": samples[0]["loaded_by_import"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
