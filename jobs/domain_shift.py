"""Ray job entrypoint: the domain-shift study (``benchmarks/domain_shift.py``).

Submit from the repository root::

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 \
        --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/domain_shift.py --config jobs/configs/domain_shift.yaml --out /mnt/shared/benchmarks/domain_shift

Every argument (the config, ``--set`` overrides, ``--out``, ...) is handed to the benchmark unchanged,
as if it were run with ``python benchmarks/domain_shift.py ARGS`` (``--help`` lists them).
"""

import runpy
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "domain_shift.py"

if __name__ == "__main__":
    if not BENCHMARK.is_file():
        sys.exit(f"{BENCHMARK}: benchmark script not found (submit with --working-dir at the repository root)")
    # Exactly what `python benchmarks/domain_shift.py ARGS` would see: its own path as argv[0], and its folder
    # first on sys.path (the benchmarks import their shared helpers with `from _common import ...`).
    sys.argv = [str(BENCHMARK), *sys.argv[1:]]
    sys.path[0] = str(BENCHMARK.parent)
    runpy.run_path(str(BENCHMARK), run_name="__main__")
