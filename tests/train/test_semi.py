"""The semi-weak mode's pieces: class-aware cross entropy against a hand computation, the
pseudo net's running IoU and the per-image weight on a hand-built case, its counters
summed over two DDP workers (gloo), and the pixel-labelled set: refused when it names a
validation image, drawn the same way twice from the train images with masks."""
from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ray_wsss.config import load_config
from ray_wsss.errors import ConfigError
from ray_wsss.train.semi import (RunningIoU, allowed_labels, class_aware_cross_entropy,
                                 restricted_argmax, tag_loss)


# ---------------------------------------------------------------- CCE

def test_cce_is_the_softmax_restricted_to_the_image_labels():
    # one image, labels (background, class 1, class 2), two pixels; the image holds
    # class 1 only: class 2's score must not count in the normalisation
    logits = torch.tensor([[[[1.0, 0.5]], [[2.0, -1.0]], [[3.0, 2.0]]]])  # (1, 3, 1, 2)
    target = torch.tensor([[[0, 1]]])
    allowed = allowed_labels(torch.tensor([[1, 0]]), background=True)
    assert allowed.tolist() == [[True, True, False]]
    by_hand = (-math.log(math.e ** 1 / (math.e ** 1 + math.e ** 2))
               - math.log(math.e ** -1 / (math.e ** 0.5 + math.e ** -1))) / 2
    assert class_aware_cross_entropy(logits, target, allowed).item() == \
        pytest.approx(by_hand, rel=1e-6)
    # the unrestricted cross entropy is another number (class 2 has the top score)
    assert F.cross_entropy(logits, target).item() > by_hand + 0.5
    # the label-restricted argmax never picks class 2
    assert restricted_argmax(logits, allowed).tolist() == [[[1, 0]]]


def test_cce_equals_cross_entropy_when_every_label_is_allowed():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, 6, generator=g)
    target = torch.randint(0, 5, (3, 7, 6), generator=g)
    target[0, :2] = 255
    allowed = torch.ones(3, 5, dtype=torch.bool)
    assert class_aware_cross_entropy(logits, target, allowed).item() == pytest.approx(
        F.cross_entropy(logits, target, ignore_index=255).item(), rel=1e-6)


def test_weighted_cce_averages_each_image_mean_times_its_weight():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, 4, generator=g)
    target = torch.randint(0, 3, (2, 4, 4), generator=g)
    target[1, 0] = 255                                   # 12 valid pixels in image 1
    allowed = torch.ones(2, 3, dtype=torch.bool)
    w = torch.tensor([0.25, 1.0])
    per_image = [F.cross_entropy(logits[i:i + 1], target[i:i + 1], ignore_index=255)
                 for i in range(2)]
    expected = (0.25 * per_image[0] + 1.0 * per_image[1]) / 2
    assert class_aware_cross_entropy(logits, target, allowed, w).item() == pytest.approx(
        expected.item(), rel=1e-6)


def test_a_target_class_missing_from_the_tags_gives_a_finite_loss():
    """A ground-truth mask may hold a class its tags lack: that class is allowed for
    the image instead of getting probability 0 (an infinite loss)."""
    logits = torch.zeros(1, 3, 2, 2)
    target = torch.full((1, 2, 2), 2)
    allowed = allowed_labels(torch.tensor([[1, 0]]), background=True)
    loss = class_aware_cross_entropy(logits, target, allowed)
    assert loss.item() == pytest.approx(math.log(3), rel=1e-6)  # bg, 1 and 2 now allowed


def test_the_tag_loss_is_bce_on_the_max_of_each_class_map():
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 1, 0, 0] = 2.0     # class 1 peaks at 2
    logits[0, 2] = -1.0          # class 2 is -1 everywhere
    logits[0, 0] = 9.0           # background is left out
    expected = (-math.log(1 / (1 + math.exp(-2.0)))          # class 1 present
                - math.log(1 - 1 / (1 + math.exp(1.0)))) / 2  # class 2 absent
    assert tag_loss(logits, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(expected)


def test_the_segmenter_loss_follows_segmenter_mode():
    """`weak` is plain cross entropy; `cce` and `pct` restrict the softmax to the tags
    (and background only where the dataset has one)."""
    from ray_wsss.train.segmenter import batch_loss

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 5, 5, generator=g)
    batch = {"mask": torch.tensor([1, 3]).view(2, 1, 1).expand(2, 5, 5).to(torch.uint8),
             "label_vector": torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])}
    weak = batch_loss(logits, batch, "weak", True)
    assert weak.item() == pytest.approx(F.cross_entropy(logits, batch["mask"].long()).item())
    # each image may take background and its one class: a 2-way softmax per pixel
    two_way = [F.cross_entropy(logits[i:i + 1, [0, c]], torch.ones(1, 5, 5).long())
               for i, c in enumerate((1, 3))]
    expected = (two_way[0] + two_way[1]) / 2
    for mode in ("cce", "pct"):
        assert batch_loss(logits, batch, mode, True).item() == pytest.approx(expected.item())
    # without background, a one-class image's pixels are certain: loss 0
    assert batch_loss(logits, batch, "cce", False).item() == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- J_c and the weight

def test_running_iou_and_image_weights_by_hand():
    iou = RunningIoU(3, momentum=0.5)
    target = torch.tensor([[0, 0, 1, 1, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1, 0, 2]])
    iou.update(pred, target)
    # label 0: T 2, P 2 (the 255 pixel is left out), TP 1 -> 1/3; label 1: T 2, P 3,
    # TP 2 -> 2/3; label 2: T 1, P 0 -> 0
    assert iou.iou().tolist() == pytest.approx([1 / 3, 2 / 3, 0.0])
    # classes 1..K of two images: {1} and {1, 2}; weight (min J) ** 2
    weights = iou.image_weights(torch.tensor([[1, 0], [1, 1]]), power=2)
    assert weights.tolist() == pytest.approx([(2 / 3) ** 2, 0.0])
    # a second batch: counters n <- 0.5 n + n_batch
    iou.update(torch.tensor([[2, 2, 1]]), torch.tensor([[2, 1, 1]]))
    tp = np.array([1, 2, 0]) * 0.5 + np.array([0, 1, 1])
    t = np.array([2, 2, 1]) * 0.5 + np.array([0, 2, 1])
    p = np.array([2, 3, 0]) * 0.5 + np.array([0, 1, 2])
    assert iou.iou().tolist() == pytest.approx((tp / (t + p - tp)).tolist())
    weights = iou.image_weights(torch.tensor([[1, 0], [1, 1]]), power=8)
    j = tp / (t + p - tp)
    assert weights.tolist() == pytest.approx([j[1] ** 8, min(j[1], j[2]) ** 8])


def test_a_label_never_seen_has_iou_zero_so_no_weight():
    iou = RunningIoU(3)
    assert iou.iou().tolist() == [0.0, 0.0, 0.0]
    assert iou.image_weights(torch.tensor([[1, 1]]), 8.0).tolist() == [0.0]


def _batches(rank: int | None, steps: int = 3):
    """Worker `rank`'s (pred, target) batches (None: every worker's, concatenated)."""
    out = []
    for step in range(steps):
        parts = []
        for r in ((0, 1) if rank is None else (rank,)):
            g = torch.Generator().manual_seed(100 * step + r)
            target = torch.randint(0, 4, (2 + r, 9, 9), generator=g)
            # worker 1 sees other images, on which the predictions are worse
            noise = torch.rand(target.shape, generator=g) < (0.2 + 0.4 * r)
            pred = torch.where(noise, torch.randint(0, 4, target.shape, generator=g), target)
            target[:, 0] = 255
            parts.append((pred, target))
        out.append((torch.cat([p for p, _ in parts]), torch.cat([t for _, t in parts])))
    return out


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        iou = RunningIoU(4, momentum=0.9)
        for pred, target in _batches(rank):
            iou.update(pred, target)
        weights = iou.image_weights(torch.tensor([[1, 0, 1], [0, 1, 0]]), 8.0)
        torch.save({"iou": iou.iou(), "weights": weights},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_counters_are_summed_over_two_ddp_workers(tmp_path):
    """Two gloo workers, each with its own images: both end with the J (and weights)
    of one worker that saw all the images; either worker alone would measure another J."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    one = RunningIoU(4, momentum=0.9)
    for pred, target in _batches(None):
        one.update(pred, target)
    expected = one.iou()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.allclose(got["iou"], expected, atol=1e-12), rank
        assert torch.allclose(got["weights"],
                              one.image_weights(torch.tensor([[1, 0, 1], [0, 1, 0]]), 8.0))
    alone = RunningIoU(4, momentum=0.9)
    for pred, target in _batches(0):
        alone.update(pred, target)
    assert (alone.iou() - expected).abs().max() > 0.05  # the reduction is what makes them equal


# ---------------------------------------------------------------- the pixel-labelled set

@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    """8 train images (train-6 and train-7 without a mask) and 3 val images."""
    from ray_wsss.data.codecs import encode_image, encode_mask
    from ray_wsss.data.dataset import DatasetInfo, DatasetWriter

    path = str(tmp_path_factory.mktemp("semi") / "dataset")
    rng = np.random.default_rng(0)
    with DatasetWriter(path, DatasetInfo(("a", "b"))) as w:
        for split, n in (("train", 8), ("val", 3)):
            for i in range(n):
                mask = rng.integers(0, 3, (8, 8)).astype(np.uint8)
                w.add({"image_id": f"{split}-{i}", "split": split,
                       "image": encode_image(rng.integers(0, 255, (8, 8, 3), np.uint8)),
                       "height": 8, "width": 8, "labels": [1, 2],
                       "mask": None if split == "train" and i >= 6 else encode_mask(mask)})
        w.commit()
    return path


def _semi_config(*overrides):
    return load_config(None, list(overrides))


def test_a_list_naming_a_val_image_is_refused_with_its_id(small_dataset, tmp_path):
    from ray_wsss.data.labelled import labelled_ids

    ids = tmp_path / "labelled.txt"
    ids.write_text("# pixel-labelled\ntrain-0\ntrain-3  # checked by hand\nval-1\n")
    with pytest.raises(ConfigError) as err:
        labelled_ids(_semi_config(f"semi.labelled_file={ids}"), small_dataset)
    msg = str(err.value)
    assert "'val-1'" in msg and "line 4" in msg and str(ids) in msg and "'val'" in msg
    for text, what in (("train-1\nnope-9\n", "'nope-9' is not in the dataset"),
                       ("train-6\n", "'train-6' has no mask"),
                       ("train-1\ntrain-1\n", "listed twice")):
        ids.write_text(text)
        with pytest.raises(ConfigError, match=what):
            labelled_ids(_semi_config(f"semi.labelled_file={ids}"), small_dataset)
    ids.write_text("train-3\ntrain-0\n\n")
    assert labelled_ids(_semi_config(f"semi.labelled_file={ids}"), small_dataset) == \
        ["train-0", "train-3"]


def test_count_and_seed_draw_the_same_train_images_with_masks(small_dataset):
    from ray_wsss.data.labelled import labelled_ids

    first = labelled_ids(_semi_config("semi.labelled_count=4", "semi.seed=3"), small_dataset)
    again = labelled_ids(_semi_config("semi.labelled_count=4", "semi.seed=3"), small_dataset)
    assert first == again and len(set(first)) == 4 and first == sorted(first)
    with_masks = {f"train-{i}" for i in range(6)}
    draws = {tuple(labelled_ids(_semi_config("semi.labelled_count=4", f"semi.seed={s}"),
                                small_dataset)) for s in range(8)}
    assert all(set(d) <= with_masks for d in draws) and len(draws) > 1
    assert labelled_ids(_semi_config("semi.labelled_count=6"), small_dataset) == \
        sorted(with_masks)
    with pytest.raises(ConfigError, match="semi.labelled_count: 7 exceeds the 6 images"):
        labelled_ids(_semi_config("semi.labelled_count=7"), small_dataset)
    assert labelled_ids(_semi_config(), small_dataset) == []


def test_the_stratified_draw_covers_every_class_then_fills_uniformly():
    """A rare class (held by one candidate of 40) is covered on every seed, where a
    uniform draw of 5 would miss it 7 times in 8; with as many places as classes every
    class is covered (each greedy pick covers at least one new class); the rest of the
    draw is spread over the other candidates; the classes left out are reported."""
    from ray_wsss.data.labelled import stratified_draw

    classes = [(1,)] * 20 + [(2,)] * 12 + [(1, 3)] * 7 + [(4,)]      # class 4: index 39
    filled = set()
    for seed in range(30):
        chosen, missing = stratified_draw(classes, 5, np.random.default_rng(seed))
        assert len(chosen) == len(set(chosen)) == 5 and missing == []
        assert 39 in chosen and {1, 2, 3, 4} <= set().union(*(classes[i] for i in chosen))
        again, _ = stratified_draw(classes, 5, np.random.default_rng(seed))
        assert again == chosen
        filled.update(chosen)
    assert len(filled) > 20          # the fill is not always the same few candidates
    # too few places: the rarest classes first, the rest reported
    chosen, missing = stratified_draw(classes, 2, np.random.default_rng(0))
    assert classes[chosen[0]] == (4,) and classes[chosen[1]] == (1, 3) and missing == [2]
    rng = np.random.default_rng(1)
    for _ in range(50):              # random instances: K places always cover K classes
        k = int(rng.integers(2, 7))
        cands = [tuple(sorted(set(rng.integers(1, k + 1, int(rng.integers(1, 3))).tolist())))
                 for _ in range(int(rng.integers(k, 15)))]
        present = set().union(*cands)
        chosen, missing = stratified_draw(cands, len(present), rng)
        assert missing == [] and set().union(*(cands[i] for i in chosen)) == present
    assert stratified_draw(classes, 0, np.random.default_rng(0)) == ([], [1, 2, 3, 4])


def test_the_labelled_draw_is_stratified_unless_asked_uniform(tmp_path, capsys):
    """Through `labelled_ids`: the default draw covers a class only one train image holds,
    `semi.draw=uniform` is the plain seeded draw, and a count too small for the classes
    warns naming the classes left out."""
    from ray_wsss.data.codecs import encode_image, encode_mask
    from ray_wsss.data.dataset import DatasetInfo, DatasetWriter
    from ray_wsss.data.labelled import labelled_ids

    path = str(tmp_path / "dataset")
    rng = np.random.default_rng(0)
    with DatasetWriter(path, DatasetInfo(("a", "b", "c"))) as w:
        for i in range(30):
            cls = 3 if i == 17 else 1 + i % 2
            mask = np.zeros((8, 8), np.uint8)
            mask[2:6, 2:6] = cls
            w.add({"image_id": f"t{i:02d}", "split": "train", "height": 8, "width": 8,
                   "image": encode_image(rng.integers(0, 255, (8, 8, 3), np.uint8)),
                   "labels": [cls], "mask": encode_mask(mask)})
        w.commit()
    uniform_hits = 0
    for seed in range(6):
        drawn = labelled_ids(_semi_config("semi.labelled_count=3", f"semi.seed={seed}"), path)
        assert "t17" in drawn and len(drawn) == 3
        uniform = labelled_ids(_semi_config("semi.labelled_count=3", f"semi.seed={seed}",
                                            "semi.draw=uniform"), path)
        expect = sorted(f"t{i:02d}" for i in
                        np.random.default_rng(seed).choice(30, size=3, replace=False))
        assert uniform == expect
        uniform_hits += "t17" in uniform
    assert uniform_hits < 6
    capsys.readouterr()
    assert len(labelled_ids(_semi_config("semi.labelled_count=1"), path)) == 1
    err = capsys.readouterr().err
    assert "semi.labelled_count=1" in err and "leaves out a, b (too few" in err
    with pytest.raises(ConfigError, match="^semi.draw: 'random' is not one of"):
        load_config(None, ["semi.draw=random"])


def test_the_semi_keys_are_checked_at_load():
    with pytest.raises(ConfigError, match="segmenter.mode: 'pct' needs pixel-labelled"):
        load_config(None, ["segmenter.mode=pct"])
    with pytest.raises(ConfigError, match="semi.labelled_file and semi.labelled_count"):
        load_config(None, ["semi.labelled_count=3", "semi.labelled_file=x.txt"])
    with pytest.raises(ConfigError, match="^pct.iou_momentum: 1.0 is not in"):
        load_config(None, ["pct.iou_momentum=1.0"])
    with pytest.raises(ConfigError, match="^semi.labelled_count: -1 is below"):
        load_config(None, ["semi.labelled_count=-1"])


def test_the_labelled_set_is_in_the_hash_and_weak_runs_keep_theirs(tmp_path):
    """Weak mode without labelled images: the semi and pct keys change no hash. The
    labelled set (count, seed, the file's content) changes the segmenter's and pct's."""
    from ray_wsss.run import Run

    from ..conftest import REPO

    def hashes(*overrides):
        run = Run(load_config(os.path.join(REPO, "configs", "demo.yaml"),
                              [f"run_dir={tmp_path}", *overrides]))
        steps = ["segmenter", "predict"] + (["pct"] if "segmenter.mode=pct" in overrides
                                             else [])
        return {s: run.current_hash(s) for s in steps}

    base = hashes()
    assert hashes("semi.seed=5", "pct.epochs=2", "segmenter.mode=weak") == base
    ids = tmp_path / "ids.txt"
    ids.write_text("a\n")
    assert hashes("semi.labelled_count=5")["segmenter"] != base["segmenter"]
    assert hashes("semi.labelled_count=5", "semi.seed=1")["segmenter"] != \
        hashes("semi.labelled_count=5")["segmenter"]
    by_file = hashes(f"semi.labelled_file={ids}", "segmenter.mode=pct")
    ids.write_text("b\n")
    edited = hashes(f"semi.labelled_file={ids}", "segmenter.mode=pct")
    assert by_file["pct"] != edited["pct"] and by_file["segmenter"] != edited["segmenter"]
    pct = hashes("semi.labelled_count=5", "segmenter.mode=pct")
    # the final fit's keys do not refit the nets; their architecture and the pct keys do
    assert hashes("semi.labelled_count=5", "segmenter.mode=pct", "segmenter.epochs=2",
                  "segmenter.lr=0.1")["pct"] == pct["pct"]
    assert hashes("semi.labelled_count=5", "segmenter.mode=pct",
                  "segmenter.aspp_channels=32")["pct"] != pct["pct"]
    assert hashes("semi.labelled_count=5", "segmenter.mode=pct", "pct.epochs=3",
                  "pct.num_workers=2")["pct"] != pct["pct"]
    assert hashes("semi.labelled_count=5", "segmenter.mode=pct", "pct.num_workers=2",
                  "pct.num_actors=1")["pct"] == pct["pct"]


def test_class_weights_weigh_each_pixel_by_its_target_in_both_cce_means():
    """With every label allowed, CCE with class weights is F.cross_entropy(weight=...);
    with image weights too, each image's mean is its weighted mean over its pixels."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 4, 4, generator=g)
    target = torch.randint(0, 3, (2, 4, 4), generator=g)
    target[0, 1] = 255
    allowed = torch.ones(2, 3, dtype=torch.bool)
    cw = torch.tensor([0.5, 2.0, 1.0])
    assert class_aware_cross_entropy(logits, target, allowed, class_weights=cw).item() == \
        pytest.approx(F.cross_entropy(logits, target, weight=cw, ignore_index=255).item(),
                      rel=1e-6)
    iw = torch.tensor([1.0, 0.5])
    by_hand = []
    for i in range(2):
        logp = torch.log_softmax(logits[i], 0)
        num = den = 0.0
        for y in range(4):
            for x in range(4):
                t = int(target[i, y, x])
                if t != 255:
                    num += -float(cw[t] * logp[t, y, x])
                    den += float(cw[t])
        by_hand.append(num / den)
    expected = (1.0 * by_hand[0] + 0.5 * by_hand[1]) / 2
    assert class_aware_cross_entropy(logits, target, allowed, iw, cw).item() == \
        pytest.approx(expected, rel=1e-5)
