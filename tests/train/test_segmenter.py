"""The segmentation model's training: joint augmentation of image and mask, the loss,
and a small fit that must learn the demo's masks."""
import os
import time

import cv2
import numpy as np
import pytest
import torch

from ray_wsss.config import ModelConfig
from ray_wsss.data.codecs import decode_mask, encode_image, encode_mask
from ray_wsss.data.demo import render
from ray_wsss.data.transforms import SegTrainTransform, joint_scale_crop, unsure_to_ignore
from ray_wsss.evaluate import ConfusionMatrix
from ray_wsss.models.deeplab import build_segmenter
from ray_wsss.train.segmenter import (label_pixel_counts, median_frequency_weights,
                                      restore_lost_tags, restore_lost_tags_batch,
                                      segmentation_loss)


def _stripes(h=90, w=130):
    """An image whose mask is a function of its pixels: the colour channel that
    dominates (R -> 1, G -> 2, B -> 3) in vertical and diagonal bands."""
    yy, xx = np.mgrid[:h, :w]
    label = ((xx // 17 + yy // 23) % 3 + 1).astype(np.uint8)
    image = np.zeros((h, w, 3), np.uint8)
    for c in range(3):
        image[..., c] = np.where(label == c + 1, 220, 30)
    return image, label


def _mask_of(image):
    return (image.astype(np.int16).argmax(-1) + 1).astype(np.uint8)


@pytest.mark.parametrize("jitter", [0.0, 0.3])
def test_augmentation_keeps_image_and_mask_aligned(jitter):
    """The mask computed from the augmented image equals the augmented mask (rescale,
    crop, pad, flip, jitter) everywhere but on the band edges, where bilinear resizing
    of the image blends two colours (a one-pixel shift would fail most of the pixels
    next to every edge, which are kept)."""
    image, label = _stripes()
    batch = {"image_id": np.array(["a", "b"], object),
             "image": np.array([encode_image(image), encode_image(image[:, ::-1].copy())],
                               object),
             "pseudo_mask": np.array([encode_mask(label), encode_mask(label[:, ::-1].copy())],
                                     object),
             "label_vector": np.ones((2, 3), np.uint8)}
    for seed in range(6):
        out = SegTrainTransform(112, (0.5, 2.0), True, jitter, seed=seed)(batch)
        assert out["image"].shape == (2, 112, 112, 3) and out["mask"].shape == (2, 112, 112)
        for img, mask in zip(out["image"], out["mask"]):
            inside = mask != 255
            assert inside.mean() > 0.2  # some of the image is in the crop
            edges = cv2.morphologyEx(mask, cv2.MORPH_GRADIENT, np.ones((3, 3))) > 0
            away = inside & ~edges
            agree = (_mask_of(img)[away] == mask[away]).mean()
            assert agree > 0.999, (seed, agree)
            # padding is ignore in the mask, and only there
            pad = (img == np.array([124, 116, 104], np.uint8)).all(-1)
            assert (mask[pad] == 255).all()


def test_joint_crop_moves_every_plane_the_same_way():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)
    plane = image[..., 0].copy()
    out, (p,) = joint_scale_crop(image, [plane], 40, 1.0, rng)  # scale 1: pure crop
    assert (out[..., 0] == p).all()


def test_the_unsure_band_ignores_middling_cam_pixels():
    target = np.array([[0, 1, 1]], np.uint8)
    cams = np.array([[[0.02, 0.2, 0.9]]], np.float32)
    assert unsure_to_ignore(target, cams, (0.05, 0.30)).tolist() == [[0, 255, 1]]
    assert unsure_to_ignore(target, cams, None).tolist() == [[0, 1, 1]]


def test_segmentation_loss_is_cross_entropy_without_ignored_pixels():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 3.0]]]])  # (1, 2 labels, 1, 2)
    target = torch.tensor([[[0, 255]]], dtype=torch.uint8)
    expected = -torch.log_softmax(torch.tensor([2.0, 0.0]), 0)[0]
    assert segmentation_loss(logits, target).item() == pytest.approx(expected.item())


def test_median_frequency_weights_by_hand():
    """Two masks of 100 pixels: A has 90 of label 1 and 10 of label 2, B 50 of label 1
    and 50 of label 3 (and 20 ignored). f1 = 140/200, f2 = 10/100, f3 = 50/100; the
    median is 0.5: weights 0.5/0.7, 5, 1; label 0 never occurs: weight 0."""
    a = np.array([1] * 90 + [2] * 10, np.uint8).reshape(10, 10)
    b = np.array([1] * 50 + [3] * 50 + [255] * 20, np.uint8).reshape(12, 10)
    counts = label_pixel_counts({"image_id": np.array(["a", "b"], object),
                                 "target": np.array([encode_mask(a), encode_mask(b)], object)},
                                "target", 4)
    assert counts["pixels"].tolist() == [[0, 90, 10, 0], [0, 50, 0, 50]]
    assert counts["present"].tolist() == [[0, 100, 100, 0], [0, 100, 0, 100]]
    w = median_frequency_weights(counts["pixels"].sum(0), counts["present"].sum(0))
    assert w == pytest.approx([0.0, 0.5 / 0.7, 5.0, 1.0])


def test_a_target_label_beyond_the_dataset_names_the_image():
    with pytest.raises(Exception, match=r"'b'.*label 7.*4 labels"):
        label_pixel_counts({"image_id": np.array(["a", "b"], object),
                            "target": np.array([encode_mask(np.ones((2, 2), np.uint8)),
                                                encode_mask(np.full((2, 2), 7, np.uint8))],
                                               object)}, "target", 4)


def _restored_by_loops(target, round_one, tags, mode):
    """loop.fallback pixel by pixel: the reference for restore_lost_tags."""
    h, w = target.shape
    tagged = [c + 1 for c, v in enumerate(tags) if v]
    held = {int(target[y, x]) for y in range(h) for x in range(w)}
    lost = [c for c in tagged if c not in held]
    out = target.copy()
    if mode == "image":
        back = [c for c in lost if (round_one == c).any()]
        return round_one.copy() if tagged and len(lost) == len(tagged) and back else out
    for y in range(h):
        for x in range(w):
            if int(round_one[y, x]) in lost:
                out[y, x] = round_one[y, x]
    return out


def test_the_fallback_puts_back_round_one_pixels_of_the_tags_the_model_lost():
    """Self-training's loop.fallback on a hand example: tags {class 0, 1, 2} (labels
    1..3); the model's target holds label 1 only, round 1's mask labels 2 in a thin
    column and 3 nowhere; label 4 (untagged) in round 1's mask never comes back."""
    target = np.zeros((4, 5), np.uint8)
    target[:, :2] = 1
    round_one = np.zeros((4, 5), np.uint8)
    round_one[:, 1] = 1
    round_one[:, 3] = 2
    round_one[0, 4] = 4
    tags = np.array([1, 1, 1, 0], np.uint8)
    out, n = restore_lost_tags(target, round_one, tags, "class")
    expected = target.copy()
    expected[:, 3] = 2
    assert n == 1 and np.array_equal(out, expected)
    assert np.array_equal(out, _restored_by_loops(target, round_one, tags, "class"))
    # a tag held by the model is never overwritten; `image` leaves a target with a tag
    assert restore_lost_tags(target, round_one, tags, "image")[1] == 0
    # a target with none of the tags: `image` gives round 1 whole, `class` its tagged part
    empty = np.zeros((4, 5), np.uint8)
    out, n = restore_lost_tags(empty, round_one, tags, "image")
    assert n == 2 and np.array_equal(out, round_one)
    out, n = restore_lost_tags(empty, round_one, tags, "class")
    assert n == 2 and np.array_equal(out, _restored_by_loops(empty, round_one, tags, "class"))
    assert out[0, 4] == 0 and (out[:, 3] == 2).all()
    # an untagged image, and `none`, are left alone; so is a target whose tags round 1
    # lost too
    assert restore_lost_tags(empty, round_one, np.zeros(4, np.uint8), "image")[1] == 0
    assert restore_lost_tags(empty, round_one, np.array([0, 0, 1, 0]), "image")[0] is empty
    assert restore_lost_tags(empty, round_one, tags, "none")[1] == 0
    rng = np.random.default_rng(0)
    for _ in range(50):
        t, r = rng.integers(0, 5, (2, 6, 7)).astype(np.uint8)
        tg = rng.integers(0, 2, 4).astype(np.uint8)
        for mode in ("class", "image"):
            assert np.array_equal(restore_lost_tags(t, r, tg, mode)[0],
                                  _restored_by_loops(t, r, tg, mode))


def test_the_fallback_batch_replaces_a_target_without_its_tags_in_image_mode():
    first = np.zeros((3, 4), np.uint8)
    first[1:, 2:] = 2
    held = np.ones((3, 4), np.uint8)
    batch = {"image_id": np.array(["a", "b"], object),
             "label_vector": np.array([[0, 1], [1, 1]], np.uint8),
             "prediction_crf": np.array([encode_mask(np.zeros((3, 4), np.uint8)),
                                         encode_mask(held)], object),
             "pseudo_mask": np.array([encode_mask(first)] * 2, object)}
    out = restore_lost_tags_batch(batch, "image", "prediction_crf", "pseudo_mask")
    assert "pseudo_mask" not in out and out["restored"].tolist() == [1, 0]
    assert np.array_equal(decode_mask(out["prediction_crf"][0]), first)
    assert out["prediction_crf"][1] is batch["prediction_crf"][1]  # b holds class 0
    batch["pseudo_mask"][1] = None
    with pytest.raises(Exception, match=r"row b: no round-1 mask \(pseudo_mask\)"):
        restore_lost_tags_batch(batch, "image", "prediction_crf", "pseudo_mask")


def test_a_pixel_labelled_image_counts_nothing_restored():
    from ray_wsss.train.segmenter import ground_truth_for

    mask = encode_mask(np.ones((2, 2), np.uint8))
    out = ground_truth_for({"image_id": np.array(["a", "b"], object),
                            "t": np.array([b"x", b"y"], object),
                            "mask": np.array([mask, mask], object),
                            "restored": np.array([2, 1])}, ["b"], "t")
    assert out["restored"].tolist() == [2, 0] and out["t"].tolist() == [b"x", mask]


def test_the_fallback_names_the_image_whose_round_one_mask_differs_in_size():
    batch = {"image_id": np.array(["a", "b"], object),
             "label_vector": np.array([[1, 0], [0, 1]], np.uint8),
             "prediction_crf": np.array([encode_mask(np.zeros((3, 4), np.uint8))] * 2, object),
             "pseudo_mask": np.array([encode_mask(np.full((3, 4), 1, np.uint8)),
                                      encode_mask(np.zeros((4, 4), np.uint8))], object)}
    with pytest.raises(Exception, match=r"row b: prediction_crf is 4x3, its round-1 mask"):
        restore_lost_tags_batch(batch, "class", "prediction_crf", "pseudo_mask")


def test_the_fallback_join_puts_back_the_classes_erased_from_the_targets(tiny_run,
                                                                         tmp_path):
    """training_rows with loop.fallback: class, on the tiny run's CRF masks as round 1's
    and, as the previous round's predictions, the same masks with one tagged class erased
    (painted background) on every other train image: the join must give the CRF masks
    back exactly, and count one class on each of those images."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ray_wsss.config import replace
    from ray_wsss.data.dataset import read_table
    from ray_wsss.train.segmenter import training_rows

    crf = tiny_run.step_path("crf")
    rows = read_table(crf, ["image_id", "pseudo_mask", "label_vector"], ["train"]).to_pylist()
    erased, predictions = set(), []
    for i, row in enumerate(rows):
        mask = decode_mask(row["pseudo_mask"])
        held = [c + 1 for c, v in enumerate(row["label_vector"]) if v and (mask == c + 1).any()]
        if i % 2 == 0 and held:
            mask = np.where(mask == held[0], 0, mask).astype(np.uint8)
            erased.add(row["image_id"])
        predictions.append({"image_id": row["image_id"], "prediction_crf": encode_mask(mask)})
    os.makedirs(tmp_path / "pred")
    pq.write_table(pa.Table.from_pylist(predictions), tmp_path / "pred" / "part-0.parquet")
    config = replace(tiny_run.config, **{"loop.feedback": "labels", "loop.fallback": "class"})
    stats: dict = {}
    out = training_rows(config, tiny_run.dataset_path, str(tmp_path / "pred"), None,
                        "prediction_crf", fallback_dir=crf, stats=stats).to_pandas()
    truth = {r["image_id"]: r["pseudo_mask"] for r in rows}
    assert len(out) == len(rows) and len(erased) >= len(rows) // 3
    assert stats == {"restored_classes": len(erased), "restored_images": len(erased),
                     "fallback_rows": len(rows)}
    for image_id, target, n in zip(out.image_id, out.prediction_crf, out.restored):
        assert np.array_equal(decode_mask(target), decode_mask(truth[image_id])), image_id
        assert n == (image_id in erased)
    assert "pseudo_mask" not in out


def test_a_small_fit_learns_the_demo_masks():
    """Eight demo scenes and their true masks, 80 px, resnet_mini DeepLabV3+ from
    scratch, 60 Adam steps with the training augmentation: training-set mIoU over the 7
    labels must pass 0.5. An untrained model scores about 0.1 (it paints every pixel
    one label); four seeds gave 0.64-0.77 in 3-5 s on one thread."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads are slower whenever another process holds a core
    scenes = [render(3, i, 80) for i in range(8)]
    batch = {"image_id": np.array([str(i) for i in range(8)], object),
             "image": np.array([encode_image(s[0]) for s in scenes], object),
             "pseudo_mask": np.array([encode_mask(s[1]) for s in scenes], object),
             "label_vector": np.ones((8, 6), np.uint8)}
    model = build_segmenter(ModelConfig(backbone="resnet_mini", output_stride=16), 7,
                            pretrained=False, aspp_channels=32, decoder_channels=32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    t0 = time.time()
    for step in range(60):
        b = SegTrainTransform(64, (0.7, 1.3), True, 0.1, seed=step)(batch)
        loss = segmentation_loss(model(torch.from_numpy(b["image"]).permute(0, 3, 1, 2).float()),
                                 torch.from_numpy(b["mask"]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    conf = ConfusionMatrix(7)
    with torch.no_grad():
        x = torch.from_numpy(np.stack([s[0] for s in scenes])).permute(0, 3, 1, 2).float()
        pred = model(x).argmax(1).numpy().astype(np.uint8)
    for (image, mask, _), p in zip(scenes, pred):
        conf.update(mask, p)
    miou = conf.metrics()["miou"]
    torch.set_num_threads(threads)
    print(f"small fit: training mIoU {miou:.3f} in {time.time() - t0:.1f}s")
    assert miou > 0.5


def test_median_frequency_weights_reach_the_fit_from_its_targets(ray_local, tmp_path):
    """segmenter.class_weights: median_frequency on 8 train images: the weights the fit
    learns with (returned in its state) are those of its targets, counted here with
    numpy: the pseudo masks, and the ground truth of the pixel-labelled image."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ray_wsss.config import load_config
    from ray_wsss.data.dataset import DatasetInfo, DatasetWriter
    from ray_wsss.train.fit import run_fit
    from ray_wsss.train.segmenter import make_trainer

    rng = np.random.default_rng(0)
    dataset, masks = str(tmp_path / "dataset"), str(tmp_path / "crf")
    os.makedirs(masks)
    pseudo, truth = {}, {}
    with DatasetWriter(dataset, DatasetInfo(("a", "b", "c"))) as w:
        for i in range(8):
            image_id = f"t{i}"
            # label 3 (c) is rare: a 4x4 square in every other image
            p = np.where(rng.random((24, 24)) < 0.7, 1, 2).astype(np.uint8)
            if i % 2:
                p[:4, :4] = 3
            p[20:, :] = 255
            pseudo[image_id], truth[image_id] = p, np.full((24, 24), 2, np.uint8)
            w.add({"image_id": image_id, "split": "train",
                   "image": encode_image(rng.integers(0, 255, (24, 24, 3), np.uint8)),
                   "height": 24, "width": 24, "labels": [1, 2, 3],
                   "mask": encode_mask(truth[image_id])})
        w.commit()
    pq.write_table(pa.table({"image_id": list(pseudo),
                             "pseudo_mask": [encode_mask(m) for m in pseudo.values()]}),
                   os.path.join(masks, "part-0.parquet"))
    config = load_config(None, ["segmenter.class_weights=median_frequency",
                                "segmenter.num_workers=0", "segmenter.epochs=1",
                                "segmenter.batch_size=4", "segmenter.crop_size=16",
                                "segmenter.aspp_channels=8", "segmenter.decoder_channels=8",
                                "segmenter.val_split=null", "segmenter.init=scratch",
                                "segmenter.torch_threads=1"])
    trainer = make_trainer(config, dataset, masks, None, None, "weights", str(tmp_path / "rt"),
                           labelled=["t0"])
    state = run_fit(trainer, "segmenter")
    targets = [truth["t0"]] + [pseudo[k] for k in pseudo if k != "t0"]
    pixels = np.zeros(4)
    present = np.zeros(4)
    for t in targets:
        valid = t[t != 255]
        for label in np.unique(valid):
            pixels[label] += (valid == label).sum()
            present[label] += valid.size
    freq = pixels[1:] / present[1:]
    expected = [0.0, *(np.median(freq) / freq)]
    assert state["class_weights"] == pytest.approx(expected)
    assert state["class_weights"][3] > 3 * state["class_weights"][1]   # the rare class
