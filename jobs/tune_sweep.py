"""Ray job entrypoint: a Ray Tune sweep over the method's constants (``raysemi tune``).

Submit from the repository root::

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 \
        --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/tune_sweep.py --config jobs/configs/brats2021.yaml \
           --set tune.num_samples=16 --set tune.max_concurrent_trials=4

Every argument is handed to ``raysemi tune`` unchanged: ``--config FILE`` and repeated ``--set key=value``.
"""

import sys

from raysemi.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
