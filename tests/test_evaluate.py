import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from minidino.config import ModelConfig
from minidino.evaluate import knn_classify
from minidino.vit import VisionTransformer


def _brute_force(train_f, train_y, test_f, k, T, n_classes):
    preds = []
    for x in test_f:
        sims = [(float(x @ f), int(y)) for f, y in zip(train_f, train_y)]
        sims.sort(key=lambda s: -s[0])
        score = [0.0] * n_classes
        for s, y in sims[:k]:
            score[y] += torch.exp(torch.tensor(s / T)).item()
        preds.append(max(range(n_classes), key=lambda c: score[c]))
    return torch.tensor(preds)


def test_knn_perfect_on_separated_clusters():
    torch.manual_seed(0)
    centers = F.normalize(torch.randn(7, 33), dim=1) * 10
    train_y, test_y = torch.arange(7).repeat(20), torch.arange(7).repeat(5)
    train_f = F.normalize(centers[train_y] + torch.randn(140, 33), dim=1)
    test_f = F.normalize(centers[test_y] + torch.randn(35, 33), dim=1)
    acc = knn_classify(train_f, train_y, test_f, test_y, ks=(1, 10, 20), chunk=8)
    assert acc == {1: 100.0, 10: 100.0, 20: 100.0}


def test_knn_matches_brute_force_on_noisy_data():
    torch.manual_seed(1)
    train_f, test_f = F.normalize(torch.randn(97, 16), dim=1), F.normalize(torch.randn(41, 16), dim=1)
    train_y, test_y = torch.randint(0, 5, (97,)), torch.randint(0, 5, (41,))
    for k in (3, 20):
        pred = _brute_force(train_f, train_y, test_f, k, 0.07, 5)
        expected = 100.0 * (pred == test_y).float().mean().item()
        got = knn_classify(train_f, train_y, test_f, test_y, ks=(k,), chunk=10)[k]
        assert abs(got - expected) < 1e-6


def test_k_larger_than_train_set_is_clipped():
    f = F.normalize(torch.randn(6, 4), dim=1)
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    acc = knn_classify(f, y, f, y, ks=(200,))
    assert set(acc) == {200} and 0 <= acc[200] <= 100


# ---- linear probe, segmentation metrics, figures, weight interop, eval.py --all ----------------------------


def test_jaccard_on_hand_made_masks():
    from minidino.evaluate import jaccard

    a = torch.zeros(4, 4, dtype=torch.bool)
    a[:2, :2] = True  # 4 pixels
    b = torch.zeros(4, 4, dtype=torch.bool)
    b[1:3, 1:3] = True  # 4 pixels, 1 shared
    empty = torch.zeros(4, 4, dtype=torch.bool)
    got = jaccard(torch.stack([a, a, a, empty]), torch.stack([a, b, empty, empty]))
    torch.testing.assert_close(got, torch.tensor([1.0, 1 / 7, 0.0, 1.0]))


def test_attention_masks_keep_the_smallest_set_with_60_percent_of_the_mass():
    from minidino.evaluate import attention_threshold_masks

    attn = torch.rand(3, 2, 37, generator=torch.Generator().manual_seed(0))  # 37 patches, odd on purpose
    keep = attention_threshold_masks(attn, mass=0.6)
    p = attn / attn.sum(-1, keepdim=True)
    kept = (p * keep).sum(-1)
    assert (kept >= 0.6 - 1e-6).all()
    # minimal: dropping the smallest kept patch falls below 60%
    smallest = torch.where(keep, p, torch.inf).min(-1).values
    assert (kept - smallest < 0.6).all()


def test_pca_foreground_finds_a_centred_object():
    from minidino.evaluate import jaccard, pca_foreground

    g = torch.Generator().manual_seed(0)
    gt = torch.zeros(4, 6, 6, dtype=torch.bool)
    gt[:, 2:5, 1:4] = True  # object away from the border
    fg_feat, bg_feat = torch.randn(16, generator=g), torch.randn(16, generator=g)
    patch = torch.where(gt.reshape(4, 36, 1), fg_feat, bg_feat) + 0.05 * torch.randn(4, 36, 16, generator=g)
    fg, rgb = pca_foreground(patch, (6, 6))
    assert jaccard(fg, gt).min() == 1.0
    assert rgb.shape == (4, 6, 6, 3) and rgb[~fg].abs().max() == 0 and 0 <= rgb.min() <= rgb.max() <= 1


def test_attention_and_pca_figures_are_written(tmp_path):
    from PIL import Image

    from minidino.evaluate import attention_threshold_masks, cls_attention, pca_foreground
    from minidino.visualize import plot_attention_maps, plot_pca

    vit = VisionTransformer(
        ModelConfig(arch="vit_nano", patch_size=4, img_size=32, n_registers=2, drop_path=0.0)
    ).eval()
    images = torch.randn(3, 3, 32, 32)
    attn = cls_attention(vit, images)
    assert attn.shape == (3, 4, 8, 8)  # registers are not part of the map
    masks = attention_threshold_masks(attn.mean(1).flatten(1)).reshape(3, 8, 8)
    a = Image.open(plot_attention_maps(images, attn, masks, str(tmp_path / "attention.png")))
    fg, rgb = pca_foreground(vit.forward_features(images)["patch"].detach(), (8, 8))
    b = Image.open(plot_pca(images, fg, rgb, str(tmp_path / "pca.png")))
    assert a.size == (6 * 160, 3 * 160) and b.size == (3 * 160, 500)  # 1.6-inch panels at 100 dpi


def test_the_figures_leave_pyplot_alone(tmp_path):
    """minidino draws its figures outside pyplot, so a notebook keeps its inline backend and its figures:
    importing minidino.visualize and drawing picks no backend and leaves no pyplot figure open (checked in a
    child process that starts on the svg backend, as a notebook starts on its inline one)."""
    code = f"""
import matplotlib, matplotlib.pyplot as plt, torch
from minidino.visualize import plot_attention_maps
plot_attention_maps(torch.randn(2, 3, 32, 32), torch.rand(2, 3, 4, 4), torch.rand(2, 4, 4) > 0.5, {str(tmp_path / "a.png")!r})
print(matplotlib.get_backend(), len(plt.get_fignums()))
"""
    env = {**os.environ, "MPLBACKEND": "svg"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["svg", "0"] and (tmp_path / "a.png").exists()


def test_timm_vit_converts_both_ways_with_identical_features():
    timm = pytest.importorskip("timm")
    from minidino.weights import from_timm, load_model_state, to_timm

    torch.manual_seed(0)
    ref = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()  # random weights
    ours = VisionTransformer(ModelConfig(arch="vit_small", patch_size=16, img_size=224, drop_path=0.0)).eval()
    load_model_state(ours, from_timm(ref.state_dict()), "timm vit_small_patch16_224")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want, got = ref.forward_features(x), ours.forward_features(x)
    assert (got["cls"] - want[:, 0]).abs().max() < 1e-5
    assert (got["patch"] - want[:, 1:]).abs().max() < 1e-5
    back = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()
    back.load_state_dict(to_timm(ours.state_dict()), strict=True)
    with torch.no_grad():
        assert (back.forward_features(x) - want).abs().max() < 1e-5


def test_eval_all_writes_the_report_and_reuses_cached_features(tmp_path, capsys):
    import json
    import os

    import eval as evaluate_cli
    import train
    from conftest import tiny_run

    run = tmp_path / "run"
    train.main(tiny_run(run, "--run.eval_at_end=false"))
    report = evaluate_cli.main(
        [str(run), "--all", "--num-workers", "0", "--seg-images", "16", "--linear-epochs", "2"]
    )
    out = run / "eval"
    for name in ("report.json", "report.md", "attention.png", "pca.png", "curves.png", "features_train.pt"):
        assert (out / name).exists(), name
    assert set(report["knn_top1"]) == {"10", "20", "100", "200"}
    assert report["linear"]["top1"] >= 0 and set(report["linear_fast"]) == {"cls", "cls+avgpool"}
    assert set(report["protocols"]) == {"knn_top1", "linear", "linear_fast", "segmentation"}
    assert "last 4 blocks" in report["protocols"]["linear"]
    assert "Protocol: DINO eval_linear: CLS of the last 4 blocks" in (out / "report.md").read_text()
    assert report["linear"]["top1"] == max(report["linear"]["top1_per_lr"].values())  # best over epochs, lrs
    seg = report["segmentation"]
    assert seg["n_images"] == 16 and len(seg["jaccard_per_head"]) == 4
    assert 0 <= seg["jaccard_mean_of_heads"] <= 1
    assert round(seg["jaccard_best_head"], 4) == max(seg["jaccard_per_head"])
    assert json.loads((out / "report.json").read_text())["knn_top1"] == report["knn_top1"]
    assert "![attention](attention.png)" in (out / "report.md").read_text()
    cached = os.path.getmtime(out / "features_train.pt")
    again = evaluate_cli.main([str(run), "--knn", "--num-workers", "0"])
    assert os.path.getmtime(out / "features_train.pt") == cached  # features came from the cache
    assert again["knn_top1"] == report["knn_top1"]


def test_eval_refuses_files_it_cannot_use_in_one_line_and_recomputes_a_broken_cache(tmp_path, capsys):
    import os

    import eval as evaluate_cli
    import train
    from conftest import tiny_run
    from minidino.weights import CheckpointError

    class Evil:  # unpickling this would run a shell command
        def __reduce__(self):
            return (os.system, ("echo PWNED",))

    torch.save({"x": Evil()}, tmp_path / "unsafe.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x00" * 100)
    torch.save({"cls_token": torch.zeros(1, 1, 8)}, tmp_path / "backbone.pth")  # neither a run nor a ViT
    for name, why in [
        ("unsafe.pt", "was refused as unsafe"),
        ("garbage.pt", "is not a readable torch file"),
        ("backbone.pth", "holds no ViT backbone"),
    ]:
        with pytest.raises(CheckpointError) as e:
            evaluate_cli.main([str(tmp_path / name), "--data", "shapes"])
        assert (
            f"checkpoint {tmp_path / name}" in str(e.value)
            and why in str(e.value)
            and "\n" not in str(e.value)
        )
        assert "weights_only=False" not in str(e.value)
    assert "PWNED" not in capsys.readouterr().out

    run = tmp_path / "run"
    train.main(tiny_run(run, "--run.eval_at_end=false", "--run.max_steps=1"))
    first = evaluate_cli.main([str(run), "--num-workers", "0"])
    cache = run / "eval" / "features_train.pt"
    cache.write_bytes(cache.read_bytes()[:100])  # an eval killed while writing it (before: a broken cache)
    again = evaluate_cli.main([str(run), "--num-workers", "0"])
    assert "feature cache" in capsys.readouterr().out and again["knn_top1"] == first["knn_top1"]
    assert torch.load(cache, weights_only=True)["cls"].shape[0] == 32  # written anew, whole


def test_random_init_knn_is_kept_and_reused_only_for_the_same_model_seed_and_data(tmp_path, monkeypatch):
    """The random-init number depends on the model, the seed and the evaluation data alone: a second run
    with those reads it from .random_init/ beside the run folders; another seed or model computes its own."""
    from minidino import evaluate
    from minidino.presets import shapes

    def cfg_with(**model):
        cfg = shapes()
        cfg.data.n_train, cfg.data.n_test, cfg.data.num_workers = 64, 32, 0
        cfg.run.out_dir = str(tmp_path / "runs" / "x")
        for k, v in model.items():
            setattr(cfg.model, k, v)
        return cfg

    calls = []
    knn_eval = evaluate.knn_eval
    monkeypatch.setattr(evaluate, "knn_eval", lambda *a, **kw: calls.append(1) or knn_eval(*a, **kw))
    backbone = VisionTransformer(cfg_with().model)
    first = evaluate.knn_against_random_init(cfg_with(), backbone, "cpu")
    assert len(calls) == 2 and len(os.listdir(tmp_path / "runs" / ".random_init")) == 1
    again = evaluate.knn_against_random_init(cfg_with(), backbone, "cpu")
    assert len(calls) == 3 and again == first  # the trained model only; the same numbers
    other = cfg_with()
    other.run.seed = 1
    evaluate.knn_against_random_init(other, backbone, "cpu")
    evaluate.knn_against_random_init(cfg_with(drop_path=0.2), backbone, "cpu")
    assert len(calls) == 7 and len(os.listdir(tmp_path / "runs" / ".random_init")) == 3
