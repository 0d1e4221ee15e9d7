import numpy as np
import pytest
import torch
from PIL import Image

from minidino.augment import MultiCropAugmentation, eval_transform
from minidino.config import DataConfig
from minidino.data import SHAPES, DataError, ShapesDataset, build_dataset, image_folder, load_rgb


def _crops(n_local: int, **kw) -> DataConfig:
    """2 x 32 px global crops (scale 0.4-1) and n local 16 px crops (scale 0.05-0.4)."""
    return DataConfig(
        global_crops_size=32,
        global_crops_scale=(0.4, 1.0),
        local_crops_number=n_local,
        local_crops_size=16,
        local_crops_scale=(0.05, 0.4),
        **kw,
    )


def test_shapes_are_deterministic_with_masks_and_disjoint_splits():
    a, b = ShapesDataset(16, 32, "train"), ShapesDataset(16, 32, "train")
    test = ShapesDataset(16, 32, "test")
    for i in (0, 5, 13):
        img_a, label_a, mask_a = a.sample(i)
        img_b, label_b, mask_b = b.sample(i)
        assert np.array_equal(np.asarray(img_a), np.asarray(img_b)) and np.array_equal(mask_a, mask_b)
        assert label_a == label_b == i % len(SHAPES)
        assert mask_a.dtype == bool and mask_a.shape == (32, 32)
        assert 0.03 < mask_a.mean() < 0.6  # the shape is there and is not the whole image
        assert not np.array_equal(np.asarray(img_a), np.asarray(test.sample(i)[0]))
    assert len(SHAPES) >= 8 and sorted(a.targets[:8]) == list(range(8))


def test_shapes_foreground_differs_from_background():
    img, _, mask = ShapesDataset(4, 32).sample(3)
    arr = np.asarray(img).astype(float)
    assert np.abs(arr[mask].mean(0) - arr[~mask].mean(0)).mean() > 20


def test_multicrop_sizes_and_count():
    aug = MultiCropAugmentation(_crops(5))
    img, _, _ = ShapesDataset(1, 32).sample(0)
    crops = aug(img)
    assert len(crops) == 7
    assert [c.shape for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 5
    assert all(c.dtype == torch.float32 for c in crops)


def test_image_smaller_than_crop_is_upsampled():
    tiny = Image.fromarray(np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8))
    crops = MultiCropAugmentation(_crops(2))(tiny)
    assert crops[0].shape == (3, 32, 32) and crops[2].shape == (3, 16, 16)
    assert eval_transform(32)(tiny).shape == (3, 32, 32)


def _write(path, mode, size=(12, 10)):
    rng = np.random.default_rng(0)
    if mode == "I;16":
        arr = rng.integers(0, 65535, size[::-1], dtype=np.uint16)
        Image.fromarray(arr).save(path)  # 16-bit grayscale PNG
    else:
        Image.new("RGB", size, (200, 30, 30)).convert(mode).save(path)


@pytest.mark.parametrize(
    "mode,ext", [("L", "png"), ("RGBA", "png"), ("CMYK", "jpg"), ("P", "png"), ("I;16", "png")]
)
def test_any_image_mode_becomes_8bit_rgb(tmp_path, mode, ext):
    path = str(tmp_path / f"x.{ext}")
    _write(path, mode)
    img = load_rgb(path)
    assert img.mode == "RGB" and img.size == (12, 10)
    arr = np.asarray(img)
    if mode == "I;16":  # rescaled, not clipped to white
        assert 60 < arr.mean() < 200 and arr.std() > 30


def test_image_folder_skips_and_counts_corrupt_files(tmp_path, capsys):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(2):
            _write(str(tmp_path / c / f"{i}.png"), "RGB")
    (tmp_path / "a" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    good = (tmp_path / "b" / "0.png").read_bytes()
    (tmp_path / "b" / "1.png").write_bytes(good[: len(good) // 2])  # truncated
    ds = image_folder(str(tmp_path), transform=eval_transform(8))
    assert ds.classes == ("a", "b") and len(ds) == 4
    results = [ds[i] for i in range(4)]
    # item 0 (corrupt) falls through to item 1; item 3 (truncated) wraps to item 0 (corrupt), then item 1
    assert [r[2] for r in results] == [1, 0, 0, 2]
    assert all(r[0].shape == (3, 8, 8) for r in results)
    out = capsys.readouterr().out
    # item 3 read the corrupt a/0.png a second time: still one warning per file
    assert out.count("skipping unreadable image") == 2
    assert out.count(f"skipping unreadable image {tmp_path / 'a' / '0.png'}") == 1


def test_a_decompression_bomb_is_skipped_and_counted(tmp_path, capsys, monkeypatch):
    (tmp_path / "a").mkdir()
    _write(str(tmp_path / "a" / "1.png"), "RGB")  # 12 x 10
    Image.new("L", (100, 100)).save(tmp_path / "a" / "0.png")
    # PIL refuses images of more than twice MAX_IMAGE_PIXELS (89 Mpx by default): the limit scaled down
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    ds = image_folder(str(tmp_path), transform=eval_transform(8))
    image, _, skipped = ds[0]
    assert skipped == 1 and image.shape == (3, 8, 8)
    assert "DecompressionBombError" in capsys.readouterr().out


def test_an_unreadable_folder_read_by_workers_is_a_one_line_error(tmp_path):
    from torch.utils.data import DataLoader

    from minidino.cli import error_line

    (tmp_path / "a").mkdir()
    for i in range(2):
        (tmp_path / "a" / f"{i}.jpg").write_bytes(b"not an image")
    loader = DataLoader(image_folder(str(tmp_path), eval_transform(8)), batch_size=2, num_workers=1)
    with pytest.raises(DataError) as e:
        next(iter(loader))
    assert "Original Traceback" in str(e.value)  # what DataLoader hands over: the worker's traceback
    assert error_line(e.value) == f"none of the 2 images could be read (first: {tmp_path / 'a' / '0.jpg'})"


def test_a_corrupt_cifar_folder_names_the_folder_without_download_advice(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"garbage")
    with pytest.raises(DataError) as e:
        build_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)), "train")
    msg = str(e.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg and "incomplete or corrupt" in msg
    assert "download" not in msg and "\n" not in msg


def test_missing_and_empty_data_folders_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match=r"does not exist"):
        build_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path / "nope")), "train")
    with pytest.raises(DataError, match=r"has no images"):
        build_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path)), "train")
    with pytest.raises(
        DataError, match=r"cifar10 not found under .*cifar-10-batches-py.*nothing is downloaded"
    ):
        build_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)), "train")
    with pytest.raises(DataError, match=r"--data.root is empty"):
        build_dataset(DataConfig(dataset="folder", root=""), "train")


def test_train_test_image_folder_pair(tmp_path):
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            _write(str(tmp_path / split / c / "0.jpg"), "RGB")
    cfg = DataConfig(dataset="cifar10", root=str(tmp_path))
    assert len(build_dataset(cfg, "train")) == 2 and build_dataset(cfg, "test").classes == ("cat", "dog")


def test_batch_multicrop_shapes_range_and_determinism():
    from minidino.augment import IMAGENET_MEAN, IMAGENET_STD, BatchMultiCrop, to_tensor_image

    ds = ShapesDataset(5, 32, transform=to_tensor_image(32))
    x = torch.stack([ds[i][0] for i in range(5)])
    aug = BatchMultiCrop(_crops(3, hue=0.5))
    a = aug(x, torch.Generator().manual_seed(3))
    b = aug(x, torch.Generator().manual_seed(3))
    assert [c.shape for c in a] == [(5, 3, 32, 32)] * 2 + [(5, 3, 16, 16)] * 3
    assert all(torch.equal(u, v) for u, v in zip(a, b))  # same generator seed, same views
    c = aug(x, torch.Generator().manual_seed(4))
    assert not torch.equal(a[0], c[0])
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    pixels = torch.cat([(v * std + mean).flatten() for v in a])
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5  # un-normalised views stay in [0, 1]


def test_batch_crop_of_whole_image_without_jitter_is_identity(monkeypatch):
    import minidino.augment as A

    # Pin every random draw: ranges that include 0 give 0 (aspect ratio 1), others their upper end; so the
    # crop is the whole image, centred, unflipped, and no jitter, grayscale or blur is applied.
    def pinned(ranges, n, g):
        return torch.stack([torch.full((n,), 0.0 if lo < 0 else float(hi)) for lo, hi in ranges])

    monkeypatch.setattr(A, "_uniform_table", pinned)
    x = torch.rand(4, 3, 16, 16)
    v = A.BatchMultiCrop().view(x, 16, (1.0, 1.0), 0.0, 0.0, torch.Generator())
    mean, std = torch.tensor(A.IMAGENET_MEAN)[:, None, None], torch.tensor(A.IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(v * std + mean, x, atol=1e-4, rtol=0)


def test_blur_sigma_is_the_official_range_from_96_px_and_scaled_below():
    """DINO's GaussianBlur draws sigma in 0.1-2.0 px on both its 224 px and its 96 px crops; only crops
    smaller than the papers use get a proportionally smaller range."""
    from minidino.augment import blur_kernel, blur_sigma

    assert blur_sigma(224) == blur_sigma(96) == (0.1, 2.0)
    assert blur_sigma(32) == pytest.approx((0.1 / 3, 2.0 / 3))
    assert blur_kernel(96) == 13 and blur_kernel(16) == 3  # +-3 sigma of the largest sigma, odd


def test_run_sampler_chains_the_epochs_in_whole_batches_and_resumes_mid_epoch():
    from minidino.loader import EpochSampler, RunSampler

    n, batch = 37, 8  # 4 whole batches per epoch, 5 samples dropped
    full = list(RunSampler(n, 0, 0, 3, 0, batch, 0, 1))
    assert len(full) == len(RunSampler(n, 0, 0, 3, 0, batch, 0, 1)) == 3 * 32
    for e in range(3):
        part = full[e * 32 : (e + 1) * 32]
        assert {ep for ep, _, _ in part} == {e} and [i for _, i, _ in part] == list(EpochSampler(n, 0, e))[
            :32
        ]
        assert [step for _, _, step in part] == [4 * e + k // 8 for k in range(32)]  # the batch's step
    resumed = list(RunSampler(n, 0, 1, 3, 16, batch, 0, 1))  # epoch 1, after its first 2 batches
    assert resumed == full[32 + 16 :]
    two = [list(RunSampler(n, 0, 0, 2, 0, batch, r, 2)) for r in (0, 1)]  # 2 processes x 4 per batch
    merged = [x for step in range(8) for r in (0, 1) for x in two[r][step * 4 : step * 4 + 4]]
    assert merged == full[:64]


def test_the_run_loader_draws_each_steps_ibot_masks_with_its_batch():
    """The iBOT masks come with the batch from the workers, and are the masks of that step (the stream
    of seeds.masks), also when the run resumes mid-epoch and with a worker process."""
    from minidino import cli
    from minidino.crops import pipeline
    from minidino.loader import SeededViews, run_loader
    from minidino.masking import step_masks

    cfg, _, _ = cli.parse_args(["--method=dinov2", "--data.n_train=40", "--optim.batch_size=8"])
    cfg.data.num_workers = 1
    views = pipeline(cfg.data)
    train_set = SeededViews(build_dataset(cfg.data, "train"), 0, views.per_image)
    loader = run_loader(train_set, cfg, 1, 3, 16, 0, 1, False, views.collate)  # epoch 1 from its 3rd step
    got = [masks for _, _, _, masks in loader]
    assert len(got) == 3 + 5  # 5 steps per epoch: 3 left of epoch 1, all of epoch 2
    for k, masks in enumerate(got):
        want = step_masks(cfg, 8, 5 + 2 + k, n_crops=2 + cfg.data.local_crops_number)
        assert torch.equal(masks.patches, want.patches) and masks.patches.shape == (16, 16)
    assert not torch.equal(got[0].patches, got[1].patches)
