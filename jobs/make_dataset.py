"""ray-wsss stage dataset: generate or import the dataset, as a script for `ray job submit`.

    ray job submit --working-dir . -- python jobs/make_dataset.py --config configs/demo.yaml \
        --run-dir runs/demo [key.sub=value ...]
"""
import sys

from ray_wsss.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("dataset"))
