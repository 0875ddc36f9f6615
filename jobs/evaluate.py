"""ray-wsss stage evaluate: mIoU / pixel accuracy / F1 against ground truth, as a script for `ray job submit`.

    ray job submit --working-dir . -- python jobs/evaluate.py --config configs/demo.yaml \
        --run-dir runs/demo [key.sub=value ...]
"""
import sys

from ray_wsss.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("evaluate"))
