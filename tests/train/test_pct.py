"""The semi-weak mode end to end on a small demo dataset: the `pct` step (hybrid + pseudo
net on Ray Train, then the hybrid net's masks of the train split on Ray Data actors),
the segmentation model fitted on them with the pixel-labelled images' ground truth, and
its predictions scored (2.5 min alone on the 2-core machine, 2026-12-07: the pct fit is
96 steps, the segmenter's 84)."""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import torch

from ray_wsss.data.codecs import decode_mask
from ray_wsss.data.dataset import read_table
from ray_wsss.pipeline import run_stage
from ray_wsss.run import Run

from ..conftest import REPO

LABELLED = 12
# 8 epochs of 12 steps: with 4, H was still climbing (val 20-35) and its masks spread
# 0.23-0.50 (two CI runs on 2026-12-07 failed a floor of 0.25); with 8, 0.34-0.62 in six
# runs (the test's docstring), for about 20 s more (137-158 s for this module alone).
PCT_EPOCHS = 8
# From scratch, no classifier (segmenter.init: scratch), a few epochs: small enough for
# a shared 2-core machine.
SEMI_OVERRIDES = [
    "data.demo.num_train=60", "data.demo.num_val=16", "data.demo.image_size=80",
    "segmenter.init=scratch", "segmenter.aspp_channels=32", "segmenter.decoder_channels=32",
    "segmenter.epochs=12", "segmenter.batch_size=8", "segmenter.crop_size=64",
    "segmenter.scale_range=[0.7,1.3]", "segmenter.torch_threads=2",
    "segmenter.mode=pct", f"semi.labelled_count={LABELLED}", "semi.seed=1",
    "segmenter.num_workers=0",  # local mode; the pct fit keeps its worker (killed below)
    f"pct.epochs={PCT_EPOCHS}", "pct.batch_size=8", "pct.crop_size=64",
    "pct.scale_range=[0.7,1.3]",
    "pct.torch_threads=2", "pct.num_actors=1",
    "predict.torch_threads=2", "predict.splits=[val]", "predict.flip=false",
    "predict.num_actors=1",
    "ray.progress_bars=false",
]


@pytest.fixture(scope="module")
def semi_run(ray_local, tmp_path_factory):
    """dataset -> pct -> segmenter -> predict (no classifier, CAMs or CRF: with
    segmenter.init scratch and mode pct nothing reads them)."""
    from ray_wsss.config import load_config

    root = str(tmp_path_factory.mktemp("semi") / "run")
    config = load_config(os.path.join(REPO, "configs", "demo.yaml"),
                         SEMI_OVERRIDES + [f"run_dir={root}"])
    run = Run(config)
    run_stage("dataset", config, run, check_upstream=False)
    # the pct fit's worker is killed once its first epoch's checkpoint is registered:
    # the fit resumes from it (both nets, both optimizers, the IoU counters)
    from ..test_fault_tolerance import _first_checkpoint_registered, _in_thread, _kill_when
    t, box = _in_thread(lambda: run_stage("pct", config, run, check_upstream=False))
    _kill_when("RayTrainWorker", _first_checkpoint_registered(
        os.path.join(root, "pct", "ray_train", "fit-*")), timeout=240)
    t.join(400)
    assert "error" not in box, box.get("error")
    for stage in ("segmenter", "predict"):
        run_stage(stage, config, run, check_upstream=False)
    return run


def test_pct_writes_both_nets_and_the_hybrid_masks_of_the_train_split(semi_run):
    run = semi_run
    pct = run.step_path("pct")
    ids = json.load(open(os.path.join(pct, "labelled.json")))["image_ids"]
    assert len(ids) == LABELLED
    for net in ("hybrid", "pseudo"):
        spec = json.load(open(os.path.join(pct, net, "model.json")))
        assert spec["kind"] == "segmenter" and spec["num_labels"] == 7
    a = torch.load(os.path.join(pct, "hybrid", "model.pt"), weights_only=True)
    b = torch.load(os.path.join(pct, "pseudo", "model.pt"), weights_only=True)
    assert not torch.equal(a["decoder.classifier.weight"], b["decoder.classifier.weight"])
    # the last checkpoint holds both nets, both optimizers and the IoU counters (resume)
    state = torch.load(sorted(glob.glob(os.path.join(pct, "ray_train", "*", "checkpoint_*",
                                                     "state.pt")))[-1], weights_only=True)
    assert {"hybrid", "pseudo", "hybrid_optimizer", "pseudo_optimizer", "iou", "epoch"} \
        <= set(state) and state["epoch"] == PCT_EPOCHS - 1 \
        and state["iou"]["counts"].shape == (3, 7)
    # one mask per train image, the image's size, labels within its tags + background
    masks = read_table(os.path.join(pct, "masks"), ["image_id", "split", "label_vector",
                                                    "pseudo_mask"])
    data = read_table(run.dataset_path, ["image_id", "height", "width"], ["train"])
    assert sorted(masks.column("image_id").to_pylist()) == \
        sorted(data.column("image_id").to_pylist())
    sizes = dict(zip(data.column("image_id").to_pylist(),
                     zip(data.column("height").to_pylist(), data.column("width").to_pylist())))
    for image_id, vec, png in zip(masks.column("image_id").to_pylist(),
                                  masks.column("label_vector").to_pylist(),
                                  masks.column("pseudo_mask").to_pylist()):
        mask = decode_mask(png)
        assert mask.shape == sizes[image_id]
        allowed = {0} | {c + 1 for c, v in enumerate(vec) if v}
        assert set(np.unique(mask).tolist()) <= allowed, image_id
    history = json.load(open(os.path.join(pct, "history.json")))
    assert len(history) == PCT_EPOCHS and all(len(h["pseudo_iou"]) == 7 for h in history)
    # killed after epoch 1's checkpoint: resumed there, epoch 1 not trained again
    assert [h["epoch"] for h in history] == list(range(1, PCT_EPOCHS + 1))
    assert history[0]["restarts"] == 0 and history[-1]["restarts"] >= 1


def test_the_segmenter_learns_the_truth_of_the_labelled_images_and_the_masks_of_the_rest(
        semi_run):
    """The rows the segmenter trains on: ground truth for the 12 pixel-labelled images
    (byte for byte the dataset's masks), the hybrid net's masks for the others."""
    from ray_wsss.train.pct import masks_folder
    from ray_wsss.train.segmenter import training_rows

    run = semi_run
    ids = json.load(open(os.path.join(run.step_path("segmenter"), "labelled.json")))[
        "image_ids"]
    rows = training_rows(run.config, run.dataset_path, masks_folder(run.step_path("pct")),
                         None, "pseudo_mask", ids).to_pandas()
    truth = read_table(run.dataset_path, ["image_id", "mask"], ["train"]).to_pandas()
    truth = dict(zip(truth.image_id, truth["mask"]))
    hybrid = read_table(masks_folder(run.step_path("pct")), ["image_id", "pseudo_mask"]
                        ).to_pandas()
    hybrid = dict(zip(hybrid.image_id, hybrid.pseudo_mask))
    assert len(rows) == 60 and "mask" not in rows
    chosen = set(ids)
    for image_id, target in zip(rows.image_id, rows.pseudo_mask):
        assert target == (truth[image_id] if image_id in chosen else hybrid[image_id])
    # the truth and H's masks differ on some labelled image (or the check above is void)
    assert any(truth[i] != hybrid[i] for i in ids)


def _all_background_miou(run, split: str, leave_out=()) -> float:
    """mIoU of painting every pixel background: what a model that learned nothing (or
    only the dominant label) scores."""
    from ray_wsss.evaluate import ConfusionMatrix

    conf = ConfusionMatrix(7)
    for row in read_table(run.dataset_path, ["image_id", "mask"], [split]).to_pylist():
        if row["image_id"] not in leave_out:
            mask = decode_mask(row["mask"])
            conf.update(mask, np.zeros_like(mask))
    return conf.metrics()["miou"]


def test_the_hybrid_masks_and_the_final_model_beat_floors(semi_run):
    """The hybrid net's masks on the 48 train images that were not pixel-labelled, and
    the segmentation model's val mIoU (predict step, full images). Painting everything
    background scores 0.12 on both. The fit is not bit-reproducible (Ray Data's
    augmentation and shuffles), and the final model follows the masks. With 4 pct
    epochs, masks 0.23-0.50 and models 0.17-0.41 (2026-11-27 to 12-07); with 8 (this
    test), masks 0.60-0.62 in four runs alone and 0.553 / 0.338 in two CI suites (H's
    val 30 in the latter, 50-52 alone), models 0.30-0.42. Floors: masks 0.25 and twice
    the all-background score (0.24, what a net that learned nothing scores), below
    every 8-epoch run; model 1.5 times it (0.18), below every model of the 8-epoch
    recipe and above a model that learned nothing."""
    run = semi_run
    metrics = run.read_metrics()
    pct = metrics["pct"]
    val = metrics["predict"]["scores"]["val"]["prediction"]["miou"]
    ids = set(json.load(open(os.path.join(run.step_path("pct"), "labelled.json")))[
        "image_ids"])
    print(f"pct masks mIoU {pct['masks_miou']:.3f} on {pct['masks']['images']} images, "
          f"H val {pct.get('val_miou')}, final val mIoU {val:.3f}")
    assert pct["labelled_images"] == LABELLED and pct["masks"]["images"] == 60 - LABELLED
    assert pct["masks_miou"] > max(0.25, 2 * _all_background_miou(run, "train", ids))
    assert val > 1.5 * _all_background_miou(run, "val")
