"""Time `import attnguide` against `import diffusers` (fresh interpreters, best and median of N each,
interleaved) and check that `import attnguide`, `attnguide --help` and `attnguide sample --help` print
nothing on stderr. Usage: python scripts/import_time.py [N]"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

N = int(sys.argv[1]) if len(sys.argv) > 1 else 5
RUNS = {
    "import diffusers": [sys.executable, "-c", "import diffusers"],
    "import attnguide": [sys.executable, "-c", "import attnguide"],
}
times: dict[str, list[float]] = {name: [] for name in RUNS}
for _ in range(N):
    for name, cmd in RUNS.items():
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        times[name].append(time.perf_counter() - t0)
        assert done.stderr == "", f"{name} printed on stderr: {done.stderr!r}"
for name, ts in times.items():
    print(f"{name:18s} best {min(ts):.3f} s   median {statistics.median(ts):.3f} s   ({N} runs)")
ratio = statistics.median(times["import attnguide"]) / statistics.median(times["import diffusers"])
print(f"ratio of medians (attnguide / diffusers): {ratio:.3f}")
for args in (["--help"], ["sample", "--help"]):
    done = subprocess.run(
        [sys.executable, "-m", "attnguide", *args], capture_output=True, text=True, check=True
    )
    print(
        f"attnguide {' '.join(args)}: stderr {done.stderr!r}, {len(done.stdout.splitlines())} lines on stdout"
    )
