"""ray-wsss sweep (Ray Tune) as a script for `ray job submit`: its trials, actors and
logs show in the Ray dashboard while it runs.

    ray job submit --working-dir . -- python jobs/sweep.py thresholds \
        --config configs/demo.yaml --run-dir runs/demo [--samples 32] [key.sub=value ...]
"""
import sys

from ray_wsss.cli import job_main

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: jobs/sweep.py NAME --config FILE [--run-dir DIR] [--samples N] ...")
    sys.exit(job_main(None, sys.argv[2:], command=f"sweep {sys.argv[1]}"))
