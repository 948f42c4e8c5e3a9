import pytest

from dist_coop.models.masks import active_blocks, depth_masks, mask_blocks, num_kept


@pytest.mark.parametrize(
    "n, s, k",
    [
        (3, 0.25, 1),
        (3, 0.5, 2),
        (3, 0.75, 2),
        (3, 1.0, 3),
        (5, 0.25, 1),
        (5, 0.5, 3),
        (5, 0.75, 4),
        (4, 0.5, 2),
        (4, 0.125, 1),
        (9, 0.25, 2),
        (9, 0.5, 5),
        (2, 0.25, 1),
        (2, 0.75, 2),
        (1, 0.25, 1),
    ],
)
def test_num_kept_rounds_half_up(n, s, k):
    assert num_kept(n, s) == k  # max(1, floor(s * n + 0.5))


def test_prefix_mask_keeps_first_blocks():
    assert active_blocks([5, 5, 5], 0.5) == ((True, True, True, False, False),) * 3
    assert active_blocks([2, 4], 0.25) == ((True, False), (True, False, False, False))


def test_spread_mask_spreads_and_keeps_block_zero():
    assert active_blocks([5], 0.5, "spread") == ((True, False, True, False, True),)
    assert active_blocks([5], 0.25, "spread") == ((True, False, False, False, False),)
    assert active_blocks([9], 0.25, "spread")[0] == tuple(i in (0, 8) for i in range(9))


@pytest.mark.parametrize("keep", ["prefix", "spread"])
@pytest.mark.parametrize("sizes", [[3, 3, 3], [5, 5, 5], [2, 2, 2, 2], [3, 4, 6, 3], [18, 18, 18]])
def test_masks_are_nested(keep, sizes):
    factors = [i / 20 for i in range(1, 21)]
    masks = [active_blocks(sizes, s, keep) for s in factors]
    for small, big in zip(masks, masks[1:]):
        for st_small, st_big in zip(small, big):
            assert all(b or not a for a, b in zip(st_small, st_big))  # kept at s -> kept at s' > s
    assert all(all(stage) for stage in masks[-1])
    assert all(stage[0] for m in masks for stage in m)  # block 0 of a stage always runs


def test_duplicate_masks_are_refused_with_both_factors_and_counts():
    with pytest.raises(ValueError, match=r"0\.5 and 0\.75.*\[3, 3, 3\].*\[2, 2, 2\]"):
        depth_masks([3, 3, 3], [0.25, 0.5, 0.75, 1.0])
    masks = depth_masks([5, 5, 5], [0.25, 0.5, 0.75, 1.0])
    assert [mask_blocks(m) for m in masks.values()] == [3, 9, 12, 15]


@pytest.mark.parametrize("s", [0.0, -0.1, 1.5])
def test_bad_factor(s):
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        active_blocks([3], s)


def test_bad_keep_mode():
    with pytest.raises(ValueError, match="keep must be one of"):
        active_blocks([3], 0.5, "random")
