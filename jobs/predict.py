"""ray-wsss stage predict: the segmentation model on every image (Ray Data actors) and its
scores, as a script for `ray job submit`.

    ray job submit --working-dir . -- python jobs/predict.py --config configs/demo.yaml \
        --run-dir runs/demo [predict.gpus_per_actor=1 ...]
"""
import sys

from ray_wsss.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("predict"))
