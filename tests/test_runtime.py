"""How the stages use Ray: output file sizes, the local instance's footer-reader pool."""
import glob
import os

import numpy as np
import pyarrow.parquet as pq

from ray_wsss.config import RayConfig
from ray_wsss.runtime import local_environment, write_parquet


def test_output_file_mb_sets_the_size_of_the_files_a_stage_writes(ray_local, tmp_path):
    import ray.data

    rows = [{"i": i, "blob": np.random.default_rng(i).bytes(64 * 1024)} for i in range(96)]
    ds = ray.data.from_items(rows).repartition(target_num_rows_per_block=8)

    write_parquet(ds, str(tmp_path / "blocks"), RayConfig(output_file_mb=0))
    write_parquet(ds, str(tmp_path / "large"), RayConfig(output_file_mb=2))
    per_block = sorted(glob.glob(str(tmp_path / "blocks" / "*.parquet")))
    large = sorted(glob.glob(str(tmp_path / "large" / "*.parquet")))
    assert len(per_block) >= 6           # 96 rows in blocks of 8 (512 KB each)
    assert 1 <= len(large) <= 3          # 6 MB in files of at least 2 MB
    assert all(os.path.getsize(f) >= 2 * 2**20 for f in large[:-1])
    for files in (per_block, large):
        ids = sorted(i for f in files for i in pq.read_table(f).column("i").to_pylist())
        assert ids == list(range(96))


def test_a_local_instance_caps_the_footer_reader_pool(monkeypatch):
    monkeypatch.delenv("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", raising=False)
    local_environment(RayConfig(num_cpus=3))
    assert os.environ["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] == "1"
    monkeypatch.delenv("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS")
    local_environment(RayConfig(num_cpus=3, local_footer_readers=4))
    assert os.environ["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] == "4"
    monkeypatch.setenv("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "7")  # the user's own wins
    local_environment(RayConfig(num_cpus=3, local_footer_readers=1))
    assert os.environ["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] == "7"


# ---------------------------------------------------------------- GPUs asked for, none usable

def _no_cuda(monkeypatch, build: str | None = None, visible: str | None = None):
    """This process as seen on a node without a usable GPU: a CPU-only torch build
    (`build` None) or a CUDA build that sees no device."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", build)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)


def test_gpus_requested_without_cuda_are_refused_naming_the_key(monkeypatch):
    import pytest

    from ray_wsss.errors import ConfigError
    from ray_wsss.runtime import torch_device

    _no_cuda(monkeypatch)
    assert torch_device(False, False, "cams.gpus_per_actor=1").type == "cpu"
    with pytest.raises(ConfigError, match=r"^cams.gpus_per_actor=1: GPUs were requested but "
                                          r"this torch build has no CUDA .*torch.version.cuda "
                                          r"is None.*set ray.allow_cpu_fallback: true"):
        torch_device(True, False, "cams.gpus_per_actor=1")
    _no_cuda(monkeypatch, build="12.4", visible="")
    with pytest.raises(ConfigError, match=r"no GPU is visible.*CUDA_VISIBLE_DEVICES=''.*"
                                          r"ray.allow_cpu_fallback"):
        torch_device(True, False, "classifier.use_gpu")
    _no_cuda(monkeypatch, build="12.4", visible="0")
    with pytest.raises(ConfigError, match=r"sees no device \(torch.cuda.device_count\(\) is 0"):
        torch_device(True, False, "classifier.use_gpu")


def test_cpu_fallback_when_allowed_runs_on_the_cpu_with_a_warning(monkeypatch, capsys):
    from ray_wsss.runtime import torch_device

    _no_cuda(monkeypatch)
    assert torch_device(True, True, "cams.gpus_per_actor=1").type == "cpu"
    err = capsys.readouterr().err
    assert "warning: cams.gpus_per_actor=1: GPUs were requested" in err
    assert "running on the CPU (ray.allow_cpu_fallback is true)" in err


def test_the_cam_map_maker_refuses_a_gpu_it_cannot_use(monkeypatch, tmp_path, capsys):
    import pytest

    from ray_wsss.cams.methods import cam
    from ray_wsss.cams.predict import MapMaker
    from ray_wsss.config import ModelConfig
    from ray_wsss.errors import ConfigError
    from ray_wsss.models.classifier import build_classifier, save_classifier

    cfg = ModelConfig(backbone="resnet_mini")
    save_classifier(build_classifier(cfg, 2, pretrained=False), cfg, str(tmp_path), ["a", "b"])
    _no_cuda(monkeypatch)
    with pytest.raises(ConfigError, match=r"cams.gpus_per_actor: GPUs were requested.*"
                                          r"ray.allow_cpu_fallback"):
        MapMaker(str(tmp_path), use_gpu=True)
    maker = MapMaker(str(tmp_path), use_gpu=True, allow_cpu_fallback=True)
    assert maker.device.type == "cpu"
    assert "running on the CPU" in capsys.readouterr().err
    image = np.zeros((32, 32, 3), np.uint8)
    maps, probs = maker.maps(cam, [image], [np.array([1])])
    assert maps[0].shape == (1, 32, 32) and probs.shape == (1, 2)


# ---------------------------------------------------------------- CPU starvation of Ray Train

def test_train_workers_that_take_every_cpu_are_refused(ray_local):
    """The local Ray has 4 CPUs: 4 workers would leave Ray Data's tasks none."""
    import pytest

    from ray_wsss.errors import ConfigError
    from ray_wsss.runtime import check_train_resources

    check_train_resources(3, 1, False, "classifier")
    with pytest.raises(ConfigError, match=r"^classifier: 4 worker\(s\) x 1 CPU = 4 CPUs, and "
                                          r"the cluster has 4: Ray Data needs at least one CPU"
                                          r".*classifier.num_workers"):
        check_train_resources(4, 1, False, "classifier")
    with pytest.raises(ConfigError, match=r"2 worker\(s\) x 2 CPU = 4 CPUs"):
        check_train_resources(2, 2, False, "segmenter")


def test_an_actor_pool_has_no_more_actors_than_batches(ray_local):
    """The local Ray has 4 CPUs: 3 actors by default, but a 2-batch input gets 2 (an
    actor without a batch only costs its start), and a pool too large is still refused
    however small the input."""
    import pytest

    from ray_wsss.actors import ActorResources, actor_count
    from ray_wsss.errors import ConfigError

    assert actor_count(ActorResources()) == 3
    assert actor_count(ActorResources(), batches=2) == 2
    assert actor_count(ActorResources(), batches=0) == 1
    assert actor_count(ActorResources(num_actors=2), batches=40) == 2
    assert actor_count(ActorResources(num_actors=2), batches=1) == 1
    with pytest.raises(ConfigError, match="4 actor"):
        actor_count(ActorResources(num_actors=4), batches=1)


def test_split_rows_counts_the_rows_of_the_named_splits(tmp_path):
    from ray_wsss.data.dataset import dataset_counts, split_rows
    from ray_wsss.data.demo import generate

    path = str(tmp_path / "ds")
    generate(path, num_train=7, num_val=3, image_size=64)
    assert dataset_counts(path) == {"train": 7, "val": 3}
    assert split_rows(path, ["train", "val"]) == 10
    assert split_rows(path, ["val", "val"]) == 3 and split_rows(path, ["test"]) == 0


def test_train_resources_of_a_given_cluster():
    """A head of 2 CPUs and a node of 1 (3 CPUs), with and without GPUs."""
    import pytest

    from ray_wsss.errors import ConfigError
    from ray_wsss.runtime import check_train_resources

    check_train_resources(2, 1, False, "classifier", cluster={"CPU": 3.0})
    with pytest.raises(ConfigError, match=r"3 worker\(s\) x 1 CPU = 3 CPUs, and the cluster "
                                          r"has 3"):
        check_train_resources(3, 1, False, "classifier", cluster={"CPU": 3.0})
    with pytest.raises(ConfigError, match=r"ray.num_cpus"):
        check_train_resources(1, 1, False, "classifier", cluster={"CPU": 1.0})
    check_train_resources(2, 1, True, "segmenter", cluster={"CPU": 8.0, "GPU": 2.0})
    with pytest.raises(ConfigError, match=r"^segmenter: 3 worker\(s\) with segmenter.use_gpu "
                                          r"need one GPU each, and the cluster has 2"):
        check_train_resources(3, 1, True, "segmenter", cluster={"CPU": 8.0, "GPU": 2.0})
    with pytest.raises(ConfigError, match=r"the cluster has 0"):
        check_train_resources(1, 1, True, "classifier", cluster={"CPU": 8.0})


def test_a_train_fit_asks_a_worker_like_task_whether_cuda_works(ray_local, capsys):
    """The probe runs where the fit's workers would; here (a CPU torch) it finds no CUDA.
    probe_gpus=0: the local Ray has no GPU to place it on."""
    import pytest
    import torch

    from ray_wsss.errors import ConfigError
    from ray_wsss.runtime import gpus_usable

    if torch.cuda.is_available():
        pytest.skip("this machine's torch has CUDA")
    assert gpus_usable(False, False, "classifier.use_gpu") is False
    with pytest.raises(ConfigError, match=r"^classifier.use_gpu: GPUs were requested but .*"
                                          r"set ray.allow_cpu_fallback: true"):
        gpus_usable(True, False, "classifier.use_gpu", probe_gpus=0)
    assert gpus_usable(True, True, "classifier.use_gpu", probe_gpus=0) is False
    assert "running on the CPU" in capsys.readouterr().err


def test_an_actor_that_refuses_its_gpu_fails_the_stage_with_one_line(ray_local):
    """Ray's ActorDiedError keeps only the text of an error raised in an actor's
    constructor; the project's error is rebuilt from it."""
    import pytest
    import ray.data
    import torch

    from ray_wsss.errors import ConfigError
    from ray_wsss.runtime import project_error

    if torch.cuda.is_available():
        pytest.skip("this machine's torch has CUDA")

    class Maker:
        def __init__(self):
            from ray_wsss.runtime import torch_device
            torch_device(True, False, "cams.gpus_per_actor=1")

        def __call__(self, batch):
            return batch

    ds = ray.data.range(4).map_batches(Maker, compute=ray.data.ActorPoolStrategy(size=1),
                                       batch_size=4)
    with pytest.raises(Exception) as err:
        ds.materialize()
    found = project_error(err.value)
    assert isinstance(found, ConfigError)
    assert str(found).startswith("cams.gpus_per_actor=1: GPUs were requested but this torch "
                                 "build has no CUDA")
    assert str(found).endswith("set ray.allow_cpu_fallback: true to run on the CPU instead")
