"""Ray job entrypoint: segment new scans with a trained model (``raysemi predict``).

Submit from the repository root (paths must be visible to every node: a shared file system)::

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 \
        --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/predict.py --config jobs/configs/brats2021.yaml <predict arguments>

Every argument is handed to ``raysemi predict`` unchanged (``raysemi predict --help`` lists them).
"""

import sys

from raysemi.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
