"""minidino/linear_eval.py: DINO's linear evaluation and the fast probe; the lr is never chosen on the test
split."""

import torch
from PIL import Image

from minidino.augment import eval_transform, linear_train_transform
from minidino.config import ModelConfig
from minidino.data import ShapesDataset
from minidino.linear_eval import dino_linear_eval, fast_linear_probe, held_out_split, linear_features
from minidino.vit import VisionTransformer


def _separable(n, g, w):
    x = torch.randn(n, 7, generator=g)
    return x, (x @ w).argmax(1)


def test_fast_probe_learns_and_chooses_its_lr_without_the_test_split():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 3, generator=g)  # 3 classes given by a linear rule in 7 dimensions
    (x_train, y_train), (x_test, y_test) = _separable(400, g, w), _separable(100, g, w)
    res = fast_linear_probe(x_train, y_train, x_test, y_test, "cpu", epochs=30, lrs=(0.01, 0.3, 3.0))
    assert set(res["held_out_top1"]) == {"0.01", "0.3", "3.0"} and res["top1"] >= 95.0
    assert res["held_out_top1"][str(res["best_lr"])] == max(res["held_out_top1"].values())
    # scrambled test labels change the reported number, never the choice
    scrambled = fast_linear_probe(
        x_train, y_train, x_test, y_test.roll(1), "cpu", epochs=30, lrs=(0.01, 0.3, 3.0)
    )
    assert scrambled["best_lr"] == res["best_lr"] and scrambled["held_out_top1"] == res["held_out_top1"]


def test_held_out_split_is_disjoint_deterministic_and_a_tenth():
    train, held = held_out_split(97, seed=3)
    assert len(held) == 10 and sorted(train + held) == list(range(97))
    assert held_out_split(97, seed=3) == (train, held) and held_out_split(97, seed=4)[1] != held


def test_linear_features_are_the_last_blocks_cls_tokens_concatenated():
    torch.manual_seed(0)
    vit = VisionTransformer(
        ModelConfig(arch="vit_nano", patch_size=8, img_size=32, drop_path=0.0, n_registers=2)
    )
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        layers = vit.get_intermediate_layers(x, 4)
        four = linear_features(vit, x, 4)
        one_pooled = linear_features(vit, x, 1, avgpool=True)
        last = vit.forward_features(x)
    assert len(layers) == 4 and four.shape == (3, 4 * 128) and one_pooled.shape == (3, 2 * 128)
    torch.testing.assert_close(four[:, -128:], last["cls"])  # the last block's CLS, after the final norm
    torch.testing.assert_close(four[:, :128], layers[0][:, 0])  # block L-3's CLS, through the same norm
    torch.testing.assert_close(one_pooled[:, 128:], last["patch"].mean(1))  # registers not in the mean


def test_dino_preprocessing_sizes():
    """k-NN / linear evaluation views: resize to 224 / 0.875 = 256, centre crop 224 (DINO's eval_knn.py and
    eval_linear.py); the training views of the linear evaluation: random resized crop 224 and flip."""
    image = Image.new("RGB", (400, 300), (10, 200, 30))
    image.paste((250, 0, 0), (0, 0, 400, 12))  # a top strip that a 256 -> 224 centre crop cuts away
    view = eval_transform(224, 0.875)(image)
    assert view.shape == (3, 224, 224) and view[0].max() < 1.0  # the red strip is gone (normalised red: 2.2)
    whole = eval_transform(224, 1.0)(image)
    assert whole[0].max() > 2.0  # crop ratio 1 keeps the short side whole, strip included
    assert linear_train_transform(224)(image).shape == (3, 224, 224)


class _Counted(torch.utils.data.Dataset):
    """A data set that counts which of its images were read."""

    def __init__(self, data):
        self.data, self.read = data, []

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        self.read.append(i)
        return self.data[i]


def test_dino_linear_eval_trains_on_the_whole_split_and_reports_the_best_epoch_and_lr():
    """DINO's eval_linear.py: every lr trains on all training images and the validation split is scored after
    each epoch; the reported number is the best of them. The held-out variant trains on 90% and picks its lr
    on the other 10%."""
    torch.manual_seed(0)
    vit = VisionTransformer(ModelConfig(arch="vit_nano", patch_size=8, img_size=32, drop_path=0.0))
    views = _Counted(ShapesDataset(40, transform=linear_train_transform(32)))
    plain = ShapesDataset(40, transform=eval_transform(32))
    test = ShapesDataset(16, split="test", transform=eval_transform(32))
    opts = dict(n_last_blocks=2, epochs=3, batch_size=16, lrs=(0.01, 0.1))
    res = dino_linear_eval(vit, views, plain, test, 8, "cpu", **opts)
    assert sorted(views.read) == sorted(list(range(40)) * 3)  # all 40 training images, each epoch
    assert "CLS of the last 2 blocks" in res["protocol"] and "best validation top-1" in res["protocol"]
    assert res["top1"] == max(res["top1_per_lr"].values()) and 1 <= res["best_epoch"] <= 3
    assert res["top1_per_lr"][str(res["best_lr"])] == res["top1"]
    views.read.clear()
    held = dino_linear_eval(vit, views, plain, test, 8, "cpu", protocol="heldout", **opts)
    assert len(views.read) == 3 * 36 and "held-out lr" in held["protocol"]  # 90% of 40, three epochs
    assert held["best_lr"] in (0.01, 0.1) and len(held["held_out_top1"]) == 2
