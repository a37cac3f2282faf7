"""Ray job entrypoint: the whole method (``raysemi run``: teacher -> pseudo-labels -> stages -> evaluation).

Submit from the repository root (the token comes from ``~/.ray/auth_token``, see README "Run on a cluster")::

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 \
        --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/run_pipeline.py --config jobs/configs/brats2021.yaml \
           --set train.storage_path=/mnt/shared/raysemi-runs

Every argument is handed to ``raysemi run`` unchanged: ``--config FILE`` and repeated ``--set key=value``.
Rerunning the same command resumes the run (same ``train.storage_path`` and ``train.run_name``).
"""

import sys

from raysemi.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
