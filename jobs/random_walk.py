"""ray-wsss stage random_walk: random-walk pseudo masks on Ray Data actors, scored, as
a script for `ray job submit` (it runs with random_walk.enabled=true; otherwise the stage
is off and skipped).

    ray job submit --working-dir . -- python jobs/random_walk.py --config configs/demo.yaml \
        --run-dir runs/demo random_walk.enabled=true [...]
"""
import sys

from ray_wsss.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("random_walk"))
