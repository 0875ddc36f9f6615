"""ray-wsss stage segmenter: fit DeepLabV3+ on the pseudo masks with Ray Train, as a script
for `ray job submit`.

    ray job submit --working-dir . -- python jobs/train_segmenter.py --config configs/demo.yaml \
        --run-dir runs/demo [segmenter.use_gpu=true segmenter.num_workers=2 ...]
"""
import sys

from ray_wsss.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("segmenter"))
