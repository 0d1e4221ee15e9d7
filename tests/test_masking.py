import torch

from minidino.masking import block_mask, ibot_masks


def _components(mask):
    """Number of 4-connected components of a 2-D bool mask."""
    seen, count = set(), 0
    h, w = mask.shape
    for i in range(h):
        for j in range(w):
            if mask[i, j] and (i, j) not in seen:
                count += 1
                stack = [(i, j)]
                while stack:
                    a, b = stack.pop()
                    if (a, b) in seen or not (0 <= a < h and 0 <= b < w) or not mask[a, b]:
                        continue
                    seen.add((a, b))
                    stack += [(a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)]
    return count


def test_ratio_within_range_and_reproducible():
    g = torch.Generator().manual_seed(0)
    masks = ibot_masks(64, 14, 14, g, ratio=(0.1, 0.5), probability=0.5)
    ratios = masks.float().mean(1)
    masked = ratios > 0
    assert 16 <= masked.sum() <= 48  # about half of the crops are masked
    assert ratios[masked].max() <= 0.5 + 1e-6 and ratios[masked].min() >= 0.05  # may stop a little short
    again = ibot_masks(64, 14, 14, torch.Generator().manual_seed(0), ratio=(0.1, 0.5), probability=0.5)
    assert torch.equal(masks, again)


def test_blocks_are_rectangles_of_at_least_min_patches():
    g = torch.Generator().manual_seed(3)
    for target in (4, 9, 20):
        m = block_mask(13, 7, target, g, min_block=4)  # odd, non-square grid
        assert 4 <= m.sum() <= target
        # a mask grown from few blocks has few connected pieces, each a union of >= 4-patch rectangles
        assert _components(m) <= m.sum() // 4


def test_single_block_is_contiguous():
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        m = block_mask(9, 9, 6, g, min_block=4)
        assert _components(m) == 1
