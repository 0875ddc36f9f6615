"""ray-wsss stage affinity: fit IRN's boundary network on the frozen classifier backbone
with Ray Train, as a script for `ray job submit` (it runs with random_walk.enabled=true;
otherwise the stage is off and skipped).

    ray job submit --working-dir . -- python jobs/train_affinity.py --config configs/demo.yaml \
        --run-dir runs/demo random_walk.enabled=true [...]
"""
import sys

from ray_wsss.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("affinity"))
