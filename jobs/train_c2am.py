"""ray-wsss stage c2am: fit C²AM with CAM hints (Ray Train, DDP), as a script for `ray job
submit` (it runs with random_walk.enabled=true affinity.labels_from=saliency; otherwise
the stage is off and skipped).

    ray job submit --working-dir . -- python jobs/train_c2am.py --config configs/demo.yaml \
        --run-dir runs/demo random_walk.enabled=true affinity.labels_from=saliency [...]
"""
import sys

from ray_wsss.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("c2am"))
