"""Report charts: round axis ticks that cover the data."""
import math

import pytest

from ray_wsss.report import line_chart, nice_ticks


@pytest.mark.parametrize("lo,hi", [(0.05, 0.95), (15.7, 61.0), (1, 8), (23.5, 99.2),
                                   (0.001, 0.0042), (-3, 7), (60.1, 61.0), (5, 5)])
def test_nice_ticks_cover_the_range_with_round_steps(lo, hi):
    start, stop, ticks = nice_ticks(lo, hi)
    assert start <= lo and stop >= hi
    assert ticks[0] == pytest.approx(start) and ticks[-1] == pytest.approx(stop)
    assert 3 <= len(ticks) <= 7
    step = ticks[1] - ticks[0]
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert min(abs(mantissa - m) for m in (1, 2, 2.5, 5)) < 1e-6
    assert all(b - a == pytest.approx(step) for a, b in zip(ticks, ticks[1:]))


def test_hand_checked_ticks():
    assert nice_ticks(0.05, 0.95) == (0.0, 1.0, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert nice_ticks(15.7, 61.0)[2] == [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0]


def test_chart_labels_are_the_round_ticks():
    svg = line_chart({"seed mIoU": ([0.05, 0.5, 0.95], [15.7, 61.0, 30.0])},
                     "background threshold", "mIoU (%)")
    for label in (">0.2<", ">0.8<", ">10<", ">70<"):
        assert label in svg
    assert ">15.7<" not in svg
