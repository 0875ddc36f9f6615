"""MCIS co-segmentation in the CAM stage: images/s with N = 1, 3, 8 peers per (image,
class) next to plain CAM, for the stage's way (peer features computed once per actor)
and for the naive way (a full backbone pass on the peer for every pair).

    python bench/bench_mcis.py [--images 96] [--threads 2] [--no-tta]

The compute of one CAM actor (`CamPredictor` on batches of 16, the demo's TTA: scales
1, 0.5, 1.5 + flip) on demo images (160x160, 1 to 3 classes each), resnet_mini with an
untrained co-attention head (speed does not depend on the weights). Peers come from a
bank of 8 train images per class, as `cams.mcis_bank` sets by default.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import torch

from common import DEMO_YAML, scratch_run

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tests.cams.test_mcis_inference import naive_cosegmentation  # noqa: E402

from ray_wsss.cams.mcis import choose_bank  # noqa: E402
from ray_wsss.cams.methods import cam  # noqa: E402
from ray_wsss.cams.stage import CamPredictor  # noqa: E402
from ray_wsss.config import load_config  # noqa: E402
from ray_wsss.data import demo  # noqa: E402
from ray_wsss.data.codecs import decode_image  # noqa: E402
from ray_wsss.data.dataset import parquet_files  # noqa: E402
from ray_wsss.models.classifier import build_classifier, save_classifier  # noqa: E402


class NaivePeers:
    """A method for `tta_maps`: MCIS with a backbone pass on the peer for every pair."""

    def __init__(self, ids, bank, peers, n, seed):
        self.ids, self.bank, self.peers, self.n, self.seed = ids, bank, peers, n, seed

    def __call__(self, model, images, classes, opts=None):
        ids = [self.ids[i % len(self.ids)] for i in range(images.shape[0])]  # + flipped half
        return naive_cosegmentation(model, cam, images, classes, ids, self.bank, self.peers,
                                    self.n, self.seed)


def rate(pred: CamPredictor, rows: dict, batch: int) -> float:
    pred({k: v[:batch] for k, v in rows.items()})  # warm-up (and the peer feature bank)
    t0, n = time.perf_counter(), 0
    for i in range(0, len(rows["image_id"]), batch):
        n += len(pred({k: v[i:i + batch] for k, v in rows.items()})["cam"])
    return n / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--no-tta", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run, _ = scratch_run(args.images)
    cfg = load_config(DEMO_YAML)
    scales, flip = ((1.0,), False) if args.no_tta else (tuple(cfg.cams.scales), cfg.cams.flip)
    model_dir = run.path("classifier-mcis")
    info = run.dataset_info()
    torch.manual_seed(0)
    save_classifier(build_classifier(cfg.model, info.num_classes, pretrained=False, mcis=True),
                    cfg.model, model_dir, info.classes)
    table = pq.read_table(parquet_files(run.dataset_path))
    rows = {c: np.array(table.column(c).to_pylist(), dtype=object)
            for c in ("image_id", "split", "image", "mask")}
    rows["label_vector"] = np.array(table.column("label_vector").to_pylist(), np.uint8)
    # the peer bank: 8 images per class from a separate set of train images
    bank_dir = os.path.join(run.root, "peers")
    demo.ensure(bank_dir, num_train=96, num_val=0, image_size=160, seed=1)
    peers_t = pq.read_table(parquet_files(bank_dir))
    peer_ids = peers_t.column("image_id").to_pylist()
    bank = choose_bank(np.array(peers_t.column("label_vector").to_pylist()), peer_ids, 8, 0)
    encoded = dict(zip(peer_ids, peers_t.column("image").to_pylist()))
    decoded = {i: decode_image(b) for i, b in encoded.items()}
    pairs = sum(int(v.sum()) for v in rows["label_vector"])
    tta = f"scales {list(scales)}{' + flip' if flip else ''}"
    print(f"MCIS co-segmentation, one CAM actor: {args.images} images 160x160 "
          f"({pairs} image-class pairs), {tta}, batch {args.batch}, resnet_mini, "
          f"{args.threads} torch threads")
    print(f"{'peers N':>8s}{'stage img/s':>13s}{'cost x CAM':>12s}{'naive img/s':>13s}"
          f"{'cost x CAM':>12s}{'stage / naive':>15s}")
    plain = rate(CamPredictor(model_dir, "cam", scales, flip, args.threads), rows, args.batch)
    print(f"{'0 (CAM)':>8s}{plain:13.1f}{1.0:12.2f}", flush=True)
    for n in (1, 3, 8):
        mcis = {"bank": bank, "images": encoded, "peers": n, "seed": 0}
        ours = rate(CamPredictor(model_dir, "cam", scales, flip, args.threads, mcis=mcis),
                    rows, args.batch)
        naive_pred = CamPredictor(model_dir, "cam", scales, flip, args.threads)
        maker = naive_pred.maker

        def naive_maps(method, images, class_sets, ids=None, _m=maker):
            return type(_m).maps(_m, NaivePeers(ids, bank, decoded, n, 0), images, class_sets)
        maker.maps = naive_maps
        count = min(len(rows["image_id"]), 2 * args.batch)  # the naive way is slow
        naive = rate(naive_pred, {k: v[:count] for k, v in rows.items()}, args.batch)
        print(f"{n:8d}{ours:13.1f}{plain / ours:12.2f}{naive:13.1f}{plain / naive:12.2f}"
              f"{ours / naive:15.1f}", flush=True)


if __name__ == "__main__":
    main()
