"""ray-wsss the whole pipeline (dataset, classifier, cams, crf, evaluate, report), as a script for `ray job submit`.

    ray job submit --working-dir . -- python jobs/pipeline.py --config configs/demo.yaml \
        --run-dir runs/demo [key.sub=value ...]
"""
import sys

from ray_wsss.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main(None))
