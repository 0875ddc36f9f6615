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
    assert os.environ["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] == "3"
    monkeypatch.setenv("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "7")  # the user's own wins
    local_environment(RayConfig(num_cpus=3, local_footer_readers=1))
    assert os.environ["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] == "7"
