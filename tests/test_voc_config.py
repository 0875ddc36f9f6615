"""configs/voc.yaml end to end on the 29 VOC 2012 photos of ../shared/data/voc12_sample,
its recipe kept but shrunk to a CPU minute: resnet_mini from scratch, one epoch, small
crops, no GPU. What is under test is the shipped file: its importer settings, splits,
scales and thresholds work together on real VOC files through every stage."""
import json
import os

import numpy as np
import pytest

from ray_wsss.config import load_config
from ray_wsss.data.codecs import decode_image, decode_mask
from ray_wsss.data.dataset import dataset_counts, read_table
from ray_wsss.pipeline import run_pipeline

from .conftest import LOCAL_FITS, REPO, data_dir

pytestmark = pytest.mark.slow

CPU_MINUTE = [
    # the sample's ImageSets hold train.txt and val.txt (no train_aug.txt)
    "data.subsets=[{split: train}, {split: val}]", "classifier.train_split=train",
    "segmenter.train_split=train", "evaluate.splits=[train]",
    "cams.splits=[train, val]",
    "model.backbone=resnet_mini", "model.pretrained=null", "segmenter.init=classifier",
    "classifier.epochs=1", "classifier.batch_size=6", "classifier.crop_size=128",
    "classifier.use_gpu=false", "classifier.cpus_per_worker=1",
    "classifier.torch_threads=2",
    # the networks see the photos at most 256 px long; maps and masks are full size
    "cams.scales=[1.0]", "cams.max_image_side=256", "predict.max_image_side=256",
    "cams.gpus_per_actor=0", "cams.cpus_per_actor=1",
    "cams.torch_threads=2", "cams.num_actors=1",
    "segmenter.epochs=1", "segmenter.batch_size=6", "segmenter.crop_size=128",
    "segmenter.aspp_channels=32", "segmenter.decoder_channels=32",
    "segmenter.use_gpu=false", "segmenter.cpus_per_worker=1", "segmenter.torch_threads=2",
    "predict.scales=[1.0]", "predict.flip=false", "predict.gpus_per_actor=0",
    "predict.cpus_per_actor=1", "predict.torch_threads=2", "predict.num_actors=1",
    "crf.iterations=2", "report.num_images=2", "ray.progress_bars=false", *LOCAL_FITS,
]


def test_voc_config_end_to_end_on_the_voc12_sample(tmp_path, ray_local):
    root = data_dir("voc12_sample")
    config = load_config(os.path.join(REPO, "configs", "voc.yaml"),
                         [f"data.path={root}", f"run_dir={tmp_path / 'run'}", *CPU_MINUTE])
    run = run_pipeline(config)
    manifest = json.load(open(os.path.join(run.root, "manifest.json")))["stages"]
    for stage in ("dataset", "classifier", "cams", "crf", "evaluate", "segmenter",
                  "predict", "report"):
        assert manifest[stage]["status"] == "done", stage
    metrics = run.read_metrics()
    assert dataset_counts(run.dataset_path) == {"train": 6, "val": 23}
    # VOC's 21 labels, masks at each photo's own size (no shrinking: max_image_side null)
    crf = read_table(run.path("crf"), ["image_id", "pseudo_mask"]).to_pylist()
    images = {r["image_id"]: r["image"] for r in read_table(
        run.dataset_path, ["image_id", "image"]).to_pylist()}
    assert len(crf) == 29
    for r in crf[:5]:
        mask = decode_mask(r["pseudo_mask"])
        assert mask.shape == decode_image(images[r["image_id"]]).shape[:2]
        assert mask.max() <= 20
    assert max(decode_image(d).shape[1] for d in images.values()) == 500
    scores = metrics["evaluate"]
    assert 0.0 <= scores["crf"]["miou"] <= 1.0
    # the predictions went through the recipe's CRF as well
    val = metrics["predict"]["scores"]["val"]
    assert set(val) >= {"prediction", "prediction_crf"} and val["images"] == 23
    assert os.path.exists(run.path("report", "index.html"))
