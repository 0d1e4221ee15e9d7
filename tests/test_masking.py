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


def test_exactly_half_masked_with_stratified_ratios_and_reproducible():
    """DINOv2's collate: int(n * probability) crops masked; the k-th of m masked crops draws its ratio in the
    k-th of m equal bins of the range, so the sorted ratios step through the range bin by bin."""
    g = torch.Generator().manual_seed(0)
    n, h, w = 37, 14, 14  # an odd number of crops: int(37 * 0.5) = 18 are masked
    masks = ibot_masks(n, h, w, g, ratio=(0.1, 0.5), probability=0.5)
    ratios = masks.float().mean(1)
    masked = ratios > 0
    assert masked.sum() == 18
    edges = torch.linspace(0.1, 0.5, 19)
    targets = (h * w * edges).floor()  # patch counts at the bin edges
    counts = masks.sum(1)[masked].sort().values.float()
    # each count lies in its own bin (a mask may stop a few patches short of its target)
    assert torch.all(counts <= targets[1:]) and torch.all(counts >= targets[:-1] - 6), (counts, targets)
    assert not torch.equal(masked, masked.sort(descending=True).values)  # which crops: a random permutation
    again = ibot_masks(n, h, w, torch.Generator().manual_seed(0), ratio=(0.1, 0.5), probability=0.5)
    assert torch.equal(masks, again)
    assert not ibot_masks(1, h, w, g, probability=0.5).any()  # int(0.5) = 0 crops


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
