"""Helpers over a dataset's ids."""
from ray_wsss.data.dataset import evenly_spaced


def test_evenly_spaced_spreads_over_the_ids():
    ids = [f"img{i:02d}" for i in range(10)]
    assert evenly_spaced(ids, 3) == ["img00", "img03", "img06"]
    assert evenly_spaced(ids, 5) == ids[::2]
    assert evenly_spaced(ids, 20) == ids
    assert evenly_spaced(ids, 0) == [] and evenly_spaced([], 4) == []
