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


def test_upper_bound_holds_for_every_draw_and_every_process():
    """The fixed buffer size (--run.cuda_graphs) is never exceeded: 37 crops per process over 1 and 3
    processes, 14 x 14 patches, many draws; and it is close to the most a process drew (no large waste at
    one process)."""
    from minidino.masking import upper_bound

    for world in (1, 3):
        n = 2 * 37 * world
        bound = upper_bound(n, 2 * 37, 196, (0.1, 0.5), 0.5)
        most = 0
        for seed in range(40):
            masks = ibot_masks(n, 14, 14, torch.Generator().manual_seed(seed), (0.1, 0.5), 0.5)
            per_process = masks.view(2, world, 37, -1).sum((0, 2, 3))
            most = max(most, int(per_process.max()))
        assert most <= bound, (most, bound)
        if world == 1:
            assert most > 0.9 * bound, (most, bound)


def test_padded_mask_buffers_leave_every_loss_and_centre_unchanged():
    """Fixed-size buffers (index 0, weight 0, valid False after the M patches) give the same iBOT loss, the
    same targets on the valid rows (softmax with a centre, and Sinkhorn, which must leave the padding out
    of its equipartition) and the same centre update as the unpadded buffers. Odd sizes: 2B = 6 crops of
    37 patches, K = 67."""
    from minidino.config import LossConfig
    from minidino.losses import IBOTLoss, ibot_loss
    from minidino.masking import StepMasks

    g = torch.Generator().manual_seed(0)
    patches = torch.rand(6, 37, generator=g) < 0.3
    plain, padded = StepMasks.of(patches), StepMasks.of(patches, size=int(patches.sum()) + 11)
    m = len(plain.indices)
    assert len(padded.indices) == m + 11 and padded.valid.sum() == m
    assert torch.equal(padded.indices[:m], plain.indices) and torch.all(padded.weights[m:] == 0)
    logits = torch.randn(6 * 37, 67, generator=g, dtype=torch.float64) * 3
    for centering in ("center", "sinkhorn"):
        cfg = LossConfig(centering=centering, ibot_weight=1.0)
        a, b = IBOTLoss(67, cfg).double(), IBOTLoss(67, cfg).double()
        a.center.normal_(generator=g)
        b.center.copy_(a.center)
        t_plain = a.teacher_probs([logits[plain.indices]], 0.07)[0]
        t_padded = b.teacher_probs([logits[padded.indices]], 0.07, padded.valid)[0]
        torch.testing.assert_close(t_padded[:m], t_plain)
        student = torch.randn(m + 11, 67, generator=g, dtype=torch.float64)
        want = ibot_loss(student[:m], t_plain, plain.weights.double(), 6, 0.1)
        torch.testing.assert_close(ibot_loss(student, t_padded, padded.weights.double(), 6, 0.1), want)
        a.update_center([logits[plain.indices]])
        b.update_center([logits[padded.indices]], padded.valid)
        torch.testing.assert_close(a.center, b.center)
