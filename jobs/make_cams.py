"""ray-wsss stage cams: class activation maps on Ray Data actors, as a script for `ray job submit`.

    ray job submit --working-dir . -- python jobs/make_cams.py --config configs/demo.yaml \
        --run-dir runs/demo [key.sub=value ...]
"""
import sys

from ray_wsss.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("cams"))
