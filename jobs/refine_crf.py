"""ray-wsss stage crf: seeds and dense-CRF pseudo masks on Ray Data, as a script for `ray job submit`.

    ray job submit --working-dir . -- python jobs/refine_crf.py --config configs/demo.yaml \
        --run-dir runs/demo [key.sub=value ...]
"""
import sys

from ray_wsss.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("crf"))
