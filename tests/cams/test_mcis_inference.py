"""MCIS co-segmentation at inference: N = 0 is plain CAM, peers are reproducible, and the
maps equal a naive reference that runs the backbone for every pair."""
import numpy as np
import torch
import torch.nn.functional as F

from ray_wsss.cams.mcis import McisMethod, PeerBank, choose_bank, co_maps, draw_peers
from ray_wsss.cams.methods import cam
from ray_wsss.cams.predict import MapMaker
from ray_wsss.config import ModelConfig
from ray_wsss.data.codecs import encode_image
from ray_wsss.models.classifier import build_classifier, save_classifier


def setup(tmp_path, n_bank=4):
    cfg = ModelConfig(backbone="resnet_mini")
    torch.manual_seed(0)
    model = build_classifier(cfg, 3, mcis=True)
    save_classifier(model, cfg, str(tmp_path), ["a", "b", "c"])
    rng = np.random.default_rng(0)
    peers = {f"p{i}": rng.integers(0, 255, (48, 64, 3), np.uint8) for i in range(6)}
    labels = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 1, 1], [0, 0, 1], [1, 0, 1]])
    bank = choose_bank(labels, list(peers), n_bank, seed=0)
    encoded = {k: encode_image(v) for k, v in peers.items()}
    images = [rng.integers(0, 255, (64, 64, 3), np.uint8) for _ in range(2)]
    return str(tmp_path), bank, encoded, peers, images


def test_bank_and_peers_are_deterministic_and_hold_the_class():
    labels = np.array([[1, 0], [1, 1], [0, 1], [1, 0]])
    bank = choose_bank(labels, ["a", "b", "c", "d"], 2, seed=3)
    assert bank == choose_bank(labels, ["a", "b", "c", "d"], 2, seed=3)
    assert all(labels[["abcd".index(i)], c] for c, ids in bank.items() for i in ids)
    peers = draw_peers(bank, "x", 0, 5, seed=1)
    assert len(peers) == 5 and peers == draw_peers(bank, "x", 0, 5, seed=1)
    assert set(peers) <= set(bank[0]) and "a" not in draw_peers({0: ["a"]}, "a", 0, 3, 1)


def test_zero_peers_is_plain_cam_and_peers_are_reproducible(tmp_path):
    model_dir, bank, encoded, _, images = setup(tmp_path)
    classes = [np.array([0, 1]), np.array([2])]
    plain = MapMaker(model_dir, (1.0, 0.5), True).maps(cam, images, classes)[0]
    off = MapMaker(model_dir, (1.0, 0.5), True, mcis={"bank": bank, "images": encoded,
                                                       "peers": 0})
    for a, b in zip(plain, off.maps(cam, images, classes, ids=["m0", "m1"])[0]):
        np.testing.assert_array_equal(a, b)
    on = {"bank": bank, "images": encoded, "peers": 3, "seed": 5}
    one = MapMaker(model_dir, (1.0, 0.5), True, mcis=on).maps(cam, images, classes, ["m0", "m1"])
    two = MapMaker(model_dir, (1.0, 0.5), True, mcis=on).maps(cam, images, classes, ["m0", "m1"])
    for a, b, p in zip(one[0], two[0], plain):
        np.testing.assert_array_equal(a, b)
        assert not np.allclose(a, p)


def naive_cosegmentation(model, method, x, wanted, ids, bank, peers, n, seed):
    """The reference: for every (image, class, peer) a full backbone pass on the peer, its
    co-attention map with the image, normalised; their mean averaged with the image's
    own normalised map. peers: {id: RGB uint8 array}."""
    with torch.no_grad():
        own, logits = method(model, x, wanted)
        out = own.clone()
        for b, image_id in enumerate(ids):
            fm = model.features(x[b:b + 1])
            for c in torch.nonzero(wanted[b]).flatten().tolist():
                co = []
                for p in draw_peers(bank, image_id, c, n, seed):  # a backbone pass per pair
                    fn = model.features(torch.from_numpy(peers[p]).permute(2, 0, 1)[None].float())
                    att, _ = model.co_attention(fm, fn)
                    m = F.relu(model.co_attention.class_maps(att)[0, c])
                    co.append(m / (m.max() + 1e-5))
                if co:
                    out[b, c] = (own[b, c] / (own[b, c].max() + 1e-5)
                                 + torch.stack(co).mean(0)) / 2
    return out, logits


def test_cosegmentation_equals_a_naive_full_forward_per_pair(tmp_path):
    model_dir, bank, encoded, peers, images = setup(tmp_path)
    model = MapMaker(model_dir).model
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    wanted = torch.tensor([[1.0, 1, 0], [0, 0, 1]])
    method = McisMethod(cam, PeerBank(encoded, bank), ["m0", "m1"], n=3, seed=5)
    maps, _ = method(model, x, wanted)
    ref, _ = naive_cosegmentation(model, cam, x, wanted, ["m0", "m1"], bank, peers, 3, 5)
    assert not torch.allclose(ref, cam(model, x, wanted)[0])  # the peers changed the maps
    torch.testing.assert_close(maps, ref, rtol=1e-4, atol=1e-5)  # float32


def test_co_maps_from_cached_projections_equal_the_module_path(tmp_path):
    """(W_cls F_n) B^T == class head of F_n B^T, peers of two sizes in one call."""
    model_dir, bank, encoded, peers, images = setup(tmp_path)
    model = MapMaker(model_dir).model
    with torch.no_grad():
        model.co_attention.W_P.weight.normal_(0, 0.05)  # not the identity it starts from
    bank_obj = PeerBank({**encoded, "big": encode_image(
        np.random.default_rng(1).integers(0, 255, (96, 80, 3), np.uint8))}, bank)
    x = torch.from_numpy(images[0]).permute(2, 0, 1)[None].float()
    ids = ["p0", "big", "p3"]
    with torch.no_grad():
        fm = model.features(x)
        got = co_maps(model, fm, [bank_obj.projected(model, p, "cpu") for p in ids])
        for p, g in zip(ids, got):
            att, _ = model.co_attention(fm, bank_obj.features(model, p, "cpu"))
            ref = F.relu(model.co_attention.class_maps(att))[0]
            ref = ref / (ref.amax(dim=(1, 2), keepdim=True) + 1e-5)
            assert g.shape == ref.shape == (3, *fm.shape[2:])
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)


def test_actors_read_the_bank_from_the_dataset_and_name_a_missing_peer(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import pytest

    from ray_wsss.errors import ConfigError

    model_dir, bank, encoded, _, images = setup(tmp_path / "model")
    ds = tmp_path / "ds"
    ds.mkdir()
    ids = sorted(encoded)
    pq.write_table(pa.table({"image_id": ids, "image": [encoded[i] for i in ids]}),
                   ds / "part-0.parquet")
    classes = [np.array([0, 1]), np.array([2])]
    by_bytes = MapMaker(model_dir, (1.0,), False, mcis={"bank": bank, "images": encoded,
                                                        "peers": 3, "seed": 5})
    by_path = MapMaker(model_dir, (1.0,), False, mcis={"bank": bank, "dataset": str(ds),
                                                       "peers": 3, "seed": 5})
    for a, b in zip(by_bytes.maps(cam, images, classes, ["m0", "m1"])[0],
                    by_path.maps(cam, images, classes, ["m0", "m1"])[0]):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ConfigError, match=r"ds: MCIS peer image\(s\) \['gone'\]"):
        MapMaker(model_dir, mcis={"bank": {0: ["gone", ids[0]]}, "dataset": str(ds),
                                  "peers": 1})
