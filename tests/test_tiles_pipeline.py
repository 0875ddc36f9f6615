"""Tiles through the prediction stage: whole-frame inference cut back into the tiles,
scores per tile that equal a scoring of the stitched frames, and `export --stitch`."""
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from ray_wsss.config import ModelConfig, load_config
from ray_wsss.data import importers
from ray_wsss.data.codecs import decode_image, decode_mask, encode_image
from ray_wsss.data.dataset import read_info, read_table
from ray_wsss.data.tiles import cut, frame_size, group_by_parent, stitch
from ray_wsss.evaluate import ConfusionMatrix
from ray_wsss.export import _export_masks
from ray_wsss.models.deeplab import build_segmenter, save_segmenter
from ray_wsss.predict import SegmentPredictor, prediction_dataset, score
from ray_wsss.run import Run
from ray_wsss.runtime import write_parquet

from .conftest import REPO

H, W = 48, 70   # 2x3 tiles of 24 x 23/23/24: uneven columns on purpose


def _tiled_dataset(tmp_path):
    """Three frames of smooth random colour with blocky masks of classes 1-2, imported as
    2x3 tiles (one tile of frame 2 has no labelled pixel and is skipped at import)."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(0)
    truth = {}
    for k in range(3):
        coarse = rng.integers(0, 255, (6, 9, 3), np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((W, H), Image.BILINEAR))
        (images / f"f{k}.png").write_bytes(encode_image(img))
        m = np.zeros((H, W), np.uint8)
        m[5:30, 10:40] = 1
        m[20:, 45:] = 2
        if k == 2:
            m[:24, 46:] = 255   # the top-right tile holds ignore only: skipped
        Image.fromarray(m).save(masks / f"f{k}.png")
        truth[f"f{k}"] = m
    out = str(tmp_path / "run" / "dataset")
    importers.import_folder([("val", str(images), str(masks))], out, classes=["a", "b"],
                            opts=importers.ImportOptions(tiles=(2, 3)))
    return out, truth


def test_whole_frame_predictions_cut_into_tiles_and_stitched_scores(tmp_path, ray_local):
    dataset, truth = _tiled_dataset(tmp_path)
    info = read_info(dataset)
    model_dir = str(tmp_path / "model")
    cfg = ModelConfig(backbone="resnet_mini")
    save_segmenter(build_segmenter(cfg, info.num_classes + 1, pretrained=False,
                                   aspp_channels=16, decoder_channels=16).eval(),
                   cfg, model_dir, info.label_names)
    config = load_config(f"{REPO}/configs/demo.yaml", [
        f"run_dir={tmp_path / 'run'}", "predict.whole_frames=true", "predict.splits=[val]",
        "predict.flip=false", "predict.num_actors=1", "ray.progress_bars=false"])
    out = str(tmp_path / "pred")
    write_parquet(prediction_dataset(config, dataset, model_dir), out, config.ray)

    rows = read_table(out, ["image_id", "mask", "prediction"]).to_pylist()
    meta = {r["image_id"]: r for r in read_table(
        dataset, ["image_id", "parent_id", "tile_box", "parent_size"]).to_pylist()}
    assert len(rows) == 3 * 6 - 1 == len(meta)
    predictor = SegmentPredictor(model_dir, flip=False)
    for r in rows:
        r.update(meta[r["image_id"]])
    frames = {}
    per_tile, stitched = ConfusionMatrix(info.num_classes + 1), ConfusionMatrix(
        info.num_classes + 1)
    for frame, group in group_by_parent(rows).items():
        image = decode_image(open(tmp_path / "images" / f"{frame}.png", "rb").read())
        # the actor sees the frame stitched from its tiles: a tile skipped at import is
        # black (frame 2's top right), and its neighbours' labels depend on that
        covered = stitch([(r["tile_box"], np.ones((r["tile_box"][2] - r["tile_box"][0],
                                                      r["tile_box"][3] - r["tile_box"][1]),
                                                     bool)) for r in group],
                         *frame_size(group), fill=False)
        image = np.where(covered[..., None], image, 0).astype(np.uint8)
        assert (~covered).sum() == (24 * 24 if frame == "f2" else 0)
        s = predictor.scores([image])[0]
        direct = s.argmax(0).astype(np.uint8)
        top2 = np.sort(s, axis=0)[-2:]
        clear = (top2[1] - top2[0]) > 1e-4
        # each tile's row holds the whole frame's labels inside its box. The actor's
        # scores may differ from this process's in the last bits (another torch thread
        # count sums the convolutions in another order), so a label may differ only
        # where the frame's two best scores are within 1e-4 of each other (an untrained
        # model has such near ties)
        for r in group:
            pred, box = decode_mask(r["prediction"]), r["tile_box"]
            differ = pred != cut(direct, box)
            assert not (differ & cut(clear, box)).any(), (r["image_id"], differ.sum())
            assert differ.mean() < 0.01, (r["image_id"], differ.sum())
            per_tile.update(decode_mask(r["mask"]), decode_mask(r["prediction"]))
        # the stitched frame scored against the full mask: pixels of a skipped tile are
        # ignore in the stitched prediction's mask too (255 in both)
        pred = stitch([(r["tile_box"], decode_mask(r["prediction"])) for r in group],
                      *frame_size(group))
        full = truth[frame].copy()
        full[pred == 255] = 255
        stitched.update(full, pred)
        frames[frame] = pred
    np.testing.assert_array_equal(per_tile.mat, stitched.mat)
    scores = score(config, info, out, ["val"])["val"]["prediction"]
    expected = stitched.metrics(info.label_names, ())
    assert scores["miou"] == pytest.approx(expected["miou"], abs=1e-9)
    assert scores["pixel_accuracy"] == pytest.approx(expected["pixel_accuracy"], abs=1e-9)

    # export --stitch: one PNG per frame, equal to the stitched tiles (255 where frame 2's
    # tile was skipped), the split list naming frames
    run = Run(config)
    assert run.dataset_path == dataset
    exported = tmp_path / "export"
    assert _export_masks(run, out, "prediction", str(exported), None, stitch=True) == 3
    for frame, pred in frames.items():
        png = decode_mask((exported / f"{frame}.png").read_bytes())
        np.testing.assert_array_equal(png, pred)
    assert (frames["f2"] == 255).sum() == 24 * 24 and (frames["f0"] == 255).sum() == 0
    assert (exported / "val.txt").read_text().split() == ["f0", "f1", "f2"]
    _export_masks(run, out, "mask", str(tmp_path / "gt"), None, stitch=True)
    for frame in frames:
        gt = decode_mask((tmp_path / "gt" / f"{frame}.png").read_bytes())
        np.testing.assert_array_equal(gt, truth[frame])


def test_frames_of_a_split_keep_their_columns_when_a_block_holds_none_of_its_rows(
        tmp_path, ray_local):
    """The rows the whole-frame prediction groups by frame: every block carries the
    columns and `frame`, also the empty block of a file that holds no row of the split
    (a train file when predicting val). Filtering and keying in two maps left such a
    block without columns (Ray Data does not call a map on an empty block), and the
    group-by's hash shuffle then failed at random on CamVid tiles ("ArrowInvalid:
    Schema at index 1 was different")."""
    import pyarrow.compute as pc
    import ray
    import ray.data

    from ray_wsss.data.dataset import TILE_COLUMNS, RowFilter, read_table
    from ray_wsss.predict import _FrameRows, frame_rows

    dataset, _ = _tiled_dataset(tmp_path)
    table = read_table(dataset, ["image_id", "split", "image", *TILE_COLUMNS])
    f0 = pc.equal(table["parent_id"], "f0")
    train = table.filter(f0).set_column(   # frame f0's tiles: a block of train rows
        table.schema.get_field_index("split"), table.schema.field("split"),
        pa.array(["train"] * int(pc.sum(f0).as_py()), pa.string()))
    two_blocks = [train, table.filter(pc.invert(f0))]

    def blocks(ds):
        mat = ds.materialize()
        return [ray.get(ref) for bundle in mat.iter_internal_ref_bundles()
                for ref in bundle.block_refs]

    keyed = sorted(blocks(frame_rows(ray.data.from_arrow(two_blocks), ["val"])),
                   key=lambda b: b.num_rows)   # the blocks come back in any order
    assert [b.num_rows for b in keyed] == [0, 11]
    for b in keyed:
        assert b.schema.names == [*table.schema.names, "frame"], b.schema
    assert sorted(set(keyed[1]["frame"].to_pylist())) == ["f1", "f2"]
    assert keyed[1]["frame"].to_pylist() == keyed[1]["parent_id"].to_pylist()
    # the reason: the filter and the key as two maps leave the empty block without columns
    filtered = ray.data.from_arrow(two_blocks).map_batches(
        RowFilter(["val"]), batch_format="pyarrow", batch_size=None)
    two_maps = blocks(filtered.map_batches(lambda t: _FrameRows(None)(t),
                                           batch_format="pyarrow", batch_size=None))
    assert sorted(len(b.schema.names) for b in two_maps)[0] == 0
