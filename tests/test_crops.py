"""The crops pipeline (`--data.augment=crops`): geometry in the workers, colour on the device."""

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from minidino import crops as C
from minidino.augment import IMAGENET_MEAN, IMAGENET_STD
from minidino.config import DataConfig, from_dict
from minidino.data import build_dataset
from minidino.loader import SeededViews


def _ks(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return float(
        np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max()
    )


@pytest.mark.parametrize("size,scale", [((500, 375), (0.05, 0.4)), ((120, 400), (0.4, 1.0))])
def test_crop_boxes_follow_torchvisions_random_resized_crop(size, scale):
    """Area share and log aspect ratio of 3000 boxes against 3000 of torchvision's, on non-square images
    (the tall one makes many tries fail, so the rejection rule and its fallback both count). The critical
    KS gap for 3000 + 3000 samples at p = 0.001 is 1.95 * sqrt(2 / 3000) = 0.050."""
    width, height = size
    torch.manual_seed(0)
    ours = np.array([C.crop_box(width, height, scale)[2:] for _ in range(3000)], dtype=float)
    img = Image.new("RGB", size)
    theirs = np.array(
        [RandomResizedCrop.get_params(img, scale, (3 / 4, 4 / 3))[2:] for _ in range(3000)], float
    )
    for stat in (lambda hw: hw[:, 0] * hw[:, 1] / (width * height), lambda hw: np.log(hw[:, 1] / hw[:, 0])):
        assert _ks(stat(ours), stat(theirs)) < 0.05
    for top, left, h, w in (C.crop_box(width, height, scale) for _ in range(200)):
        assert 0 <= top <= height - h and 0 <= left <= width - w and h > 0 and w > 0


def test_crop_box_fallback_is_torchvisions():
    """When no try fits (a 10 x 1000 strip, whole-image area), both take the same centred box."""
    img = Image.new("RGB", (10, 1000))
    assert C.crop_box(10, 1000, (1.0, 1.0)) == RandomResizedCrop.get_params(img, (1.0, 1.0), (3 / 4, 4 / 3))
    assert C.crop_box(1000, 10, (1.0, 1.0)) == RandomResizedCrop.get_params(
        Image.new("RGB", (1000, 10)), (1.0, 1.0), (3 / 4, 4 / 3)
    )


def test_reduced_decode_never_gives_a_crop_fewer_pixels_than_it_needs():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        width, height = (int(v) for v in rng.integers(20, 5000, 2))
        sizes = [224, 224, 96]
        boxes = [C.crop_box(width, height, (0.05, 1.0)) for _ in sizes]
        r = C.reduction(boxes, sizes)
        assert r in (1, 2, 4, 8)
        # PIL's draft decodes to at least the requested size: ceil(size / r) or more
        dw, dh = math.ceil(width / r), math.ceil(height / r)
        for box, s in zip(boxes, sizes):
            t, lft, h, w = C.scaled_box(box, (width, height), (dw, dh))
            assert (h >= s and w >= s) or r == 1
            assert 0 <= t and t + h <= dh and 0 <= lft and lft + w <= dw


def test_a_large_jpeg_is_decoded_at_reduced_scale_and_still_gives_full_crops(tmp_path):
    path = tmp_path / "big.jpg"
    arr = np.random.default_rng(0).integers(0, 255, (3000, 4000, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, quality=90)
    cfg = DataConfig(global_crops_size=224, local_crops_size=96, local_crops_number=2)
    worker = C.WorkerCrops(cfg)
    torch.manual_seed(0)
    img = worker.decode(str(path))
    assert img.width < 4000 and img.mode == "RGB"  # DCT scaling did happen
    (_, boxes) = worker.pending
    assert C.reduction(boxes, [224, 224, 96, 96]) > 1
    views, params = worker(img)
    assert [tuple(v.shape) for v in views] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 2
    assert all(v.dtype == torch.uint8 for v in views) and params.shape == (4, C.N_PARAMS)


def test_parameter_tables_have_the_papers_probabilities_and_ranges():
    cfg = DataConfig(global_crops_size=224, local_crops_size=96, local_crops_number=10, hue=0.1)
    worker = C.WorkerCrops(cfg)
    torch.manual_seed(0)
    t = torch.stack([worker.draw_params() for _ in range(2000)])  # (images, 12 crops, N_PARAMS)
    flat = t.reshape(-1, C.N_PARAMS)
    tol = 0.02
    assert abs(flat[:, C.JITTER].mean() - 0.8) < tol and abs(flat[:, C.GRAY].mean() - 0.2) < tol
    blurred = (t[..., C.SIGMA] > 0).float().mean(0)  # per crop kind: 1.0, 0.1, then 0.5 for the locals
    assert blurred[0] == 1 and abs(blurred[1] - 0.1) < tol and (blurred[2:] - 0.5).abs().max() < 0.04
    solarized = t[..., C.SOLARIZE].mean(0)
    assert solarized[0] == 0 and abs(solarized[1] - 0.2) < tol and solarized[2:].sum() == 0
    on = flat[flat[:, C.JITTER] > 0]
    for col, lo, hi in (
        (C.BRIGHTNESS, 0.6, 1.4),
        (C.CONTRAST, 0.6, 1.4),
        (C.SATURATION, 0.8, 1.2),
        (C.HUE, -0.1, 0.1),
    ):
        v = on[:, col]
        assert lo <= v.min() < lo + 0.01 and hi - 0.01 < v.max() <= hi
        assert abs(v.mean() - (lo + hi) / 2) < 0.01  # uniform
    off = flat[flat[:, C.JITTER] == 0]
    assert torch.equal(off[:, C.BRIGHTNESS : C.HUE + 1], torch.tensor([1.0, 1, 1, 0]).expand(len(off), 4))
    orders = flat[:, C.ORDER : C.ORDER + 4].long()
    assert torch.equal(orders.sort(1).values, torch.arange(4).expand_as(orders))  # permutations
    counts = torch.unique(orders, dim=0, return_counts=True)[1]
    assert len(counts) == 24 and counts.min() > 0.7 * len(orders) / 24  # all 24 orders, about equally


def test_blur_sigma_of_the_crops_is_the_official_range_at_96_and_224_px():
    cfg = DataConfig(global_crops_size=224, local_crops_size=96, local_crops_number=1)
    worker = C.WorkerCrops(cfg)
    torch.manual_seed(1)
    sigma = torch.stack([worker.draw_params()[:, C.SIGMA] for _ in range(3000)])
    for kind in (0, 2):  # 224 px (always blurred) and 96 px
        s = sigma[:, kind][sigma[:, kind] > 0]
        assert 0.1 <= s.min() < 0.11 and 1.99 < s.max() <= 2.0


def _table(order, factors, gray=0.0, sigma=0.0, solarize=0.0, jitter=1.0) -> torch.Tensor:
    row = torch.zeros(1, C.N_PARAMS)
    row[0, C.JITTER] = jitter
    row[0, C.BRIGHTNESS : C.HUE + 1] = torch.tensor(factors)
    row[0, C.ORDER : C.ORDER + 4] = torch.tensor(order, dtype=torch.float32)
    row[0, C.GRAY], row[0, C.SIGMA], row[0, C.SOLARIZE] = gray, sigma, solarize
    return row


def _unnormalise(x: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return x * std + mean


def _photo(seed=0, size=37) -> torch.Tensor:
    """A uint8 'photo' (3, size, size) with smooth colour regions and saturated pixels: the cases where the
    clamps and hue sectors matter."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 5, 5, generator=g) ** 2
    img = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[0]
    return (img * 255).round().to(torch.uint8)


CASES = [  # (order, brightness, contrast, saturation, hue), gray, sigma, solarize
    ((0, 1, 2, 3), (1.3, 0.7, 1.15, 0.08), 0, 0, 0),
    ((3, 2, 1, 0), (0.65, 1.35, 0.85, -0.1), 0, 1.3, 0),
    ((1, 3, 0, 2), (1.1, 1.2, 1.2, 0.5), 0, 0, 1),
    ((2, 0, 3, 1), (0.9, 0.8, 0.8, -0.45), 1, 2.0, 1),
]


@pytest.mark.parametrize("order,factors,gray,sigma,solarize", CASES)
def test_colour_equals_torchvisions_float_operations(order, factors, gray, sigma, solarize):
    """For fixed parameters: torchvision's tensor functions in the same order (float, so no rounding):
    equal within float32 rounding and the gray weights' last digit, blur included (reflect padding)."""
    img = _photo(len(order) + int(sigma * 10))
    out = _unnormalise(C.colour(img[None], _table(order, factors, gray, sigma, solarize))[0])
    ref = img.float() / 255
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for op in order:
        ref = ops[op](ref, factors[op])
    if gray:
        ref = TF.rgb_to_grayscale(ref, num_output_channels=3)
    if sigma:
        ref = TF.gaussian_blur(ref, [C.blur_kernel(37)] * 2, [sigma, sigma])  # 37 px: kernel 7
    if solarize:
        ref = TF.solarize(ref, 128 / 255)
    # torchvision's gray weights are 0.2989 / 0.587 / 0.114, ours ITU-R 601's 0.299: 1e-4 at most
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=0)


@pytest.mark.parametrize("order,factors,gray,sigma,solarize", CASES)
def test_colour_equals_the_per_image_pil_path_within_rounding(order, factors, gray, sigma, solarize):
    """The reference path works on PIL images, which truncate to 8 bits after every operation (measured:
    +0.45 grey levels on average per operation) and shift the hue in an 8-bit HSV image (up to ~8 levels
    on saturated pixels). Stated tolerance: on average at most 0.6 grey levels per jitter operation, and
    20 levels (8 %) at the worst pixel, after the later operations have scaled the hue's error."""
    img = _photo(7)
    out = _unnormalise(C.colour(img[None], _table(order, factors, gray, sigma, solarize))[0])
    pil = TF.to_pil_image(img)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for op in order:
        pil = ops[op](pil, factors[op])
    if gray:
        pil = TF.rgb_to_grayscale(pil, num_output_channels=3)
    ref = TF.to_dtype(TF.to_image(pil), torch.float32, scale=True)
    if sigma:  # the reference's blur runs on the tensor too (torchvision v2 converts PIL for it)
        ref = TF.gaussian_blur(ref, [C.blur_kernel(37)] * 2, [sigma, sigma])
    if solarize:
        ref = TF.solarize(ref, 128 / 255)
    diff = (out - ref).abs() * 255
    assert diff.mean() < 0.6 * len(order) and diff.max() <= 20, (diff.mean(), diff.max())


def test_colour_of_a_stack_equals_colour_of_each_row():
    """Grouping rows by operation order must not mix them up: a stack of 20 rows with random tables is,
    row by row, what each row gives alone."""
    torch.manual_seed(0)
    worker = C.WorkerCrops(DataConfig(local_crops_number=18, global_crops_size=32, local_crops_size=32))
    table = worker.draw_params()
    stack = torch.stack([_photo(i, 32) for i in range(len(table))])
    together = C.colour(stack, table)
    alone = torch.cat([C.colour(stack[i : i + 1], table[i : i + 1]) for i in range(len(table))])
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=0)
    assert not torch.allclose(together[0], together[1])


def test_no_jitter_no_blur_is_only_normalisation():
    img = _photo(3)
    out = C.colour(img[None], _table((0, 1, 2, 3), (1.0, 1.0, 1.0, 0.0), jitter=0.0))
    torch.testing.assert_close(_unnormalise(out[0]), img.float() / 255, atol=1e-6, rtol=0)


def _image_folder(root, n=6, size=(90, 60)):
    rng = np.random.default_rng(0)
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
            root / f"c{i % 2}" / f"{i}.jpg"
        )
    return root


def test_views_depend_only_on_seed_epoch_and_index(tmp_path):
    cfg = DataConfig(
        dataset="imagefolder",
        root=str(_image_folder(tmp_path / "d")),
        global_crops_size=32,
        local_crops_size=16,
        local_crops_number=2,
    )
    views = C.pipeline(cfg)
    a = SeededViews(build_dataset(cfg, "train"), 0, views.per_image)
    b = SeededViews(build_dataset(cfg, "train"), 0, views.per_image)
    (ca, pa), _, _ = a[3]
    _ = b[1]  # another item first: state left behind must not matter
    (cb, pb), _, _ = b[3]
    assert all(torch.equal(u, v) for u, v in zip(ca, cb)) and torch.equal(pa, pb)
    b.epoch = 1
    (cc, pc), _, _ = b[3]
    assert not torch.equal(pa, pc)
    batch, labels, skipped = views.collate([a[i] for i in range(4)])
    out = views.on_device(batch, torch.device("cpu"), None)
    assert [tuple(v.shape) for v in out] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2
    assert labels.tolist() == [0, 0, 0, 1] and skipped.sum() == 0


def test_odd_images_are_handled_and_a_corrupt_one_is_skipped_and_counted(tmp_path):
    root = tmp_path / "odd" / "c"
    root.mkdir(parents=True)
    Image.new("L", (40, 30), 128).save(root / "a_gray.png")
    Image.new("CMYK", (40, 30), (10, 200, 30, 0)).save(root / "b_cmyk.jpg")
    Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16)).save(root / "c_16bit.png")
    Image.new("RGB", (3, 2), (200, 10, 10)).save(root / "d_tiny.png")
    (root / "e_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    cfg = DataConfig(
        dataset="imagefolder",
        root=str(tmp_path / "odd"),
        global_crops_size=32,
        local_crops_size=16,
        local_crops_number=1,
    )
    views = C.pipeline(cfg)
    ds = SeededViews(build_dataset(cfg, "train"), 0, views.per_image)
    items = [ds[i] for i in range(len(ds))]
    assert sum(s for _, _, s in items) == 1  # the corrupt file, replaced by the next one and counted
    out = views.on_device(views.collate(items)[0], torch.device("cpu"), None)
    assert [tuple(v.shape) for v in out] == [(5, 3, 32, 32)] * 2 + [(5, 3, 16, 16)]
    assert all(torch.isfinite(v).all() for v in out)
    sixteen = _unnormalise(out[0][2])  # the 16-bit image, rescaled (40000 / 65535 of white), not clipped
    assert 0.3 < sixteen.mean() < 0.9


def test_old_run_configs_with_batch_augment_still_load():
    assert from_dict({"data": {"batch_augment": True}}).data.augment == "batch"
    assert from_dict({"data": {"batch_augment": False}}).data.augment == "pil"


def test_jitter_operations_compile_whole_and_equal_eager():
    """--run.compile puts each jitter operation under torch.compile (inductor); here with aot_eager (no C++
    compiler needed): each traces as one graph with dynamic shapes and gives the eager values."""
    torch.manual_seed(0)
    x, f, turns = torch.rand(3, 3, 37, 37), torch.rand(3) * 0.8 + 0.6, torch.rand(3) - 0.5
    for op, arg in zip(C.JITTER_OPS, (f, f, f, turns)):
        compiled = torch.compile(op, backend="aot_eager", dynamic=True, fullgraph=True)
        torch.testing.assert_close(compiled(x.clone(), arg), op(x.clone(), arg), atol=1e-6, rtol=0)
