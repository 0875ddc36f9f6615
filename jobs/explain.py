"""ray-wsss explain (CAM methods compared: XAI metrics, seed mIoU) as a script for
`ray job submit`.

    ray job submit --working-dir . -- python jobs/explain.py --config configs/demo.yaml \
        --run-dir runs/demo [--methods cam,gradcam,minmax] [key.sub=value ...]
"""
import sys

from ray_wsss.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main(None, command="explain"))
