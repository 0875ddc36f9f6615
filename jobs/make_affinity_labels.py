"""ray-wsss stage affinity_labels: IRN's affinity labels from the CAMs of the train
split (Ray Data tasks), as a script for `ray job submit` (it runs with
random_walk.enabled=true; otherwise the stage is off and skipped).

    ray job submit --working-dir . -- python jobs/make_affinity_labels.py --config configs/demo.yaml \
        --run-dir runs/demo random_walk.enabled=true [...]
"""
import sys

from ray_wsss.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("affinity_labels"))
