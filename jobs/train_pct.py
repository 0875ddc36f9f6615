"""ray-wsss stage pct: progressive cross training of the hybrid and pseudo nets (semi-weak
mode) with Ray Train, then the hybrid net's masks of the train split, as a script for
`ray job submit`.

    ray job submit --working-dir . -- python jobs/train_pct.py --config configs/demo.yaml \
        --run-dir runs/semi segmenter.mode=pct semi.labelled_count=25 [pct.use_gpu=true ...]
"""
import sys

from ray_wsss.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("pct"))
