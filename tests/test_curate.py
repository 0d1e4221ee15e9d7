"""Data curation (minidino/curation/curate.py, minidino/curation/copy_detection.py): the search and grouping against brute force,
k-means and balanced sampling on data with known structure, the copy descriptor's loss against a loop and its
training against its start, and the command line on a small shapes pool written here."""

import itertools
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import train
from conftest import tiny_run
from minidino.config import ConfigError
from minidino.curation import curate, embedding, pools, similarity
from minidino.data import DataError, draw_shape


def test_nearest_in_blocks_equals_brute_force(monkeypatch):
    g = torch.Generator().manual_seed(0)
    q, k = (
        F.normalize(torch.randn(37, 13, generator=g), dim=-1),
        F.normalize(torch.randn(197, 13, generator=g), dim=-1),
    )
    monkeypatch.setattr(similarity, "SCORE_BLOCK", 5 * 197)  # blocks of 5 queries (the last one of 2)
    sims, ids = similarity.nearest(q, k, 7)
    full = (q @ k.T).topk(7, dim=1)
    assert torch.equal(ids, full.indices) and torch.allclose(sims, full.values)
    sims, ids = similarity.nearest(k, k, 3, exclude_self=True)  # no row finds itself
    brute = (k @ k.T).fill_diagonal_(-math.inf).topk(3, dim=1)
    assert torch.equal(ids, brute.indices) and not (ids == torch.arange(197)[:, None]).any()


def test_groups_are_connected_components_and_keep_the_largest_image():
    # 0-1 and 1-2 similar (0 and 2 are not), 3-4 similar, 5 alone: chains join 0, 1, 2 into one group
    angles = torch.tensor([0.0, 0.30, 0.60, 2.0, 2.1, 4.0])
    feats = torch.stack([angles.cos(), angles.sin()], 1)
    threshold = math.cos(0.35)  # above it: pairs within 0.35 rad
    assert feats[0] @ feats[2] < threshold
    pixels = torch.tensor([10, 40, 40, 5, 9, 1])
    groups = curate.duplicate_groups(feats, pixels, threshold, k=2)
    assert sorted(groups) == [[1, 2, 0], [4, 3]]  # most pixels first, a tie (1 and 2) by the lower index
    assert similarity.components(6, torch.tensor([[0, 1], [1, 2], [3, 4]])).tolist() == [0, 0, 0, 3, 3, 5]


def _chain_and_star(n_chain=13, n_star=8, n_alone=15):
    """37 unit vectors in 64 dims: a chain along an arc, 5 degrees a step (dims 0-1); a star, a centre with
    most pixels and copies at 3 degrees from it in orthogonal directions (dims 2-10, the copies 4.2 degrees
    from each other); and random images far from all of them (dims 11-63)."""
    g = torch.Generator().manual_seed(0)
    feats = torch.zeros(n_chain + 1 + n_star + n_alone, 64)
    step = math.radians(5)
    for i in range(n_chain):
        feats[i, 0], feats[i, 1] = math.cos(i * step), math.sin(i * step)
    centre = n_chain
    feats[centre, 2] = 1
    for j in range(n_star):
        feats[centre + 1 + j, 2] = 1
        feats[centre + 1 + j, 3 + j] = math.tan(math.radians(3))
    feats[centre + 1 + n_star :, 11:] = torch.randn(n_alone, 53, generator=g)
    pixels = torch.full((len(feats),), 100)
    pixels[centre] = 200
    return F.normalize(feats, dim=-1), pixels, centre


def test_images_joined_only_through_a_chain_are_counted_and_warned_about():
    feats, pixels, centre = _chain_and_star()
    t = math.cos(math.radians(6))  # joins the chain's neighbours and the star, not the chain's ends
    groups = curate.duplicate_groups(feats, pixels, t)
    assert sorted(groups) == [list(range(13)), list(range(centre, centre + 9))]
    # the chain's image 0 is kept; images 2..12 are more than 6 degrees from it, image 1 is 5 degrees away.
    # The star's copies are all 3 degrees from its centre: none is weakly linked
    assert curate.weakly_linked(feats, groups, t) == sum(
        math.cos(math.radians(5 * i)) < t for i in range(1, 13)
    )
    assert curate.weakly_linked(feats, groups, t) == 11
    # at cos(4 degrees) the chain falls apart and the star stays whole, joined through its centre
    sweep = curate.threshold_sweep(feats, pixels, [t, math.cos(math.radians(4))])
    assert [(r["removed"], r["groups"], r["largest"], r["weakly_linked"]) for r in sweep] == [
        (12 + 8, 2, 13, 11),
        (8, 1, 9, 0),
    ]
    assert sweep[0]["weak_share"] == pytest.approx(11 / 20) and sweep[1]["weak_share"] == 0
    warning = curate.chaining_warning(sweep, t)
    assert "11 of the 20 images" in warning and "largest group has 13" in warning and "55% at" in warning
    assert curate.chaining_warning(sweep, sweep[1]["threshold"]) is None  # 0 %
    few = curate.threshold_sweep(feats[:6], pixels[:6], [t])  # 4 of 5 weakly linked, but too few to warn
    assert few[0]["weak_share"] == 0.8 and curate.chaining_warning(few, t) is None
    assert curate.sweep_thresholds(0.915) == [0.885, 0.895, 0.905, 0.915, 0.925, 0.935, 0.945, 0.955]
    assert curate.sweep_thresholds(0.97123) == [0.9412, 0.9512, 0.9612, 0.97123, 0.9812, 0.9912]  # below 1


def test_split_evenly_water_fills():
    assert similarity.split_evenly(20, [1, 10, 10]) == [1, 9, 10]
    assert similarity.split_evenly(100, [3, 4]) == [3, 4]  # asks for more than there is: everything
    rng = np.random.default_rng(0)
    for _ in range(50):
        sizes = rng.integers(0, 30, rng.integers(1, 9)).tolist()
        n = int(rng.integers(0, 120))
        take = similarity.split_evenly(n, sizes)
        assert sum(take) == min(n, sum(sizes)) and all(0 <= t <= s for t, s in zip(take, sizes))
        short = [t for t, s in zip(take, sizes) if t < s]  # groups that could give more differ by <= 1
        assert not short or max(take) - min(short) <= 1


def _blobs(
    counts: list[int], dim: int = 11, noise: float = 0.05, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(len(counts), dim, generator=g), dim=-1)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return F.normalize(centres[labels] + noise * torch.randn(len(labels), dim, generator=g), dim=-1), labels


def test_kmeans_recovers_separated_clusters_deterministically():
    x, labels = _blobs([40, 41, 37, 45, 40])  # 203 points, k = 5
    centroids, assign = similarity.kmeans(x, 5, seed=3)
    for c in range(5):  # every cluster holds one blob, every blob one cluster
        assert assign[labels == c].unique().numel() == 1
    assert assign.unique().numel() == 5 and torch.allclose(centroids.norm(dim=1), torch.ones(5))
    assert torch.equal(similarity.kmeans(x, 5, seed=3)[1], assign)


def test_balanced_sampling_raises_the_entropy_of_an_imbalanced_pool():
    counts = [300] + [30] * 7  # one class 10x each of the seven others
    x, labels = _blobs(counts, seed=1)
    before = similarity.entropy(torch.bincount(labels))
    levels = similarity.hierarchical_kmeans(x, (40, 8), seed=0)
    pick = similarity.balanced_sample(levels, 240, seed=0)
    after = similarity.entropy(torch.bincount(labels[pick], minlength=8))
    # 1.48 nats before; the 240 drawn are ~30 per class: ln 8 = 2.08 is the most there is
    assert len(pick) == 240 and pick.unique().numel() == 240
    assert before == pytest.approx(1.478, abs=1e-3) and after > 2.0, (before, after)
    uniform = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:240]
    assert (
        similarity.entropy(torch.bincount(labels[uniform], minlength=8)) < 1.6
    )  # random sampling keeps the skew
    assert torch.equal(similarity.balanced_sample(levels, 240, seed=0), pick)
    assert not torch.equal(similarity.balanced_sample(levels, 240, seed=1), pick)


def test_select_removes_duplicates_and_contaminated_images_in_order():
    x, _ = _blobs([1] * 12, dim=16, noise=0.0, seed=2)  # 12 distinct directions
    pool = torch.cat([x, x[:3], x[5:6]])  # images 12-14 copy 0-2, image 15 copies 5
    pixels = torch.ones(16, dtype=torch.long)
    readable = torch.ones(16, dtype=torch.bool)
    readable[11] = False
    out = curate.select(pool, pixels, readable, 0.99, evaluation=x[5:6], levels=(3, 2))
    assert sorted(out["groups"]) == [[0, 12], [1, 13], [2, 14], [5, 15]]
    assert out["contaminated"] == [5]  # its copy 15 went with the duplicates already
    assert out["kept"].nonzero()[:, 0].tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]
    assert out["stages"] == [("pool", 16), ("readable", 15), ("deduplicated", 11), ("decontaminated", 10)]
    sample = curate.select(pool, pixels, readable, 0.99, balance=4, levels=(3, 2))
    assert sample["kept"].sum() == 4 and sample["stages"][-1] == ("balanced", 4)
    near = curate.select(pool, pixels, readable, 0.99, curated=x[7:8], retrieve_k=1, levels=(3, 2))
    assert near["kept"].nonzero()[:, 0].tolist() == [7]


def _pool(tmp_path):
    """20 shapes images, exact copies of 3 of them, one unreadable file, and an evaluation folder with 2 images
    whose exact copies are also in the pool."""
    pool, held = tmp_path / "pool", tmp_path / "heldout"
    gt = pools.write_shapes_pool(str(pool), 20, seed=4, copies={1: 1, 2: 1, 3: 1}, kinds=("exact",))
    os.makedirs(held / "a")
    for i in (40, 41):
        img = draw_shape(i, 32, 9)[0]
        img.save(held / "a" / f"{i}.png")
        img.save(pool / f"heldout_copy_{i}.png")
    (pool / "broken.png").write_bytes(b"not an image")
    return gt, pool, held


@pytest.fixture(scope="module")
def backbone_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("curate") / "run"
    train.main(tiny_run(run, "--run.eval_at_end=false"))
    return run


def test_command_line_on_a_shapes_pool(tmp_path, backbone_run, capsys):
    gt, pool, held = _pool(tmp_path)
    out = tmp_path / "out"
    args = [str(pool), "--backbone", str(backbone_run), "--out", str(out), "--eval-sets", str(held)]
    report = curate.main(args + ["--copy-steps", "0", "--threshold", "0.9999", "--links", "--levels", "4,2"])
    files = (out / "files.txt").read_text().split()
    names = {os.path.basename(f) for f in files}
    assert report["stages"] == {"pool": 26, "readable": 25, "deduplicated": 22, "decontaminated": 20}
    assert not {f"{i:06d}_dup0.png" for i in (1, 2, 3)} & names  # copies go, their originals stay
    assert {f"{i:06d}.png" for i in range(20)} <= names and not any("heldout" in n for n in names)
    assert report["unreadable"] == [str(pool / "broken.png")] and len(os.listdir(out / "images")) == 20
    for fig in ("duplicates.png", "threshold.png", "clusters.png", "cluster_sizes.png", "report.md"):
        assert (out / fig).stat().st_size > 0
    saved = json.loads((out / "report.json").read_text())
    assert saved["duplicate_groups"] == 3 and len(saved["threshold_sweep"]) == 4  # 0.9999, 3 below
    assert (
        saved["threshold_sweep"][-1]["removed"] == 3
        and "| 0.9999 (used) | 3 | 3 |" in (out / "report.md").read_text()
    )
    # the same call again reads the cached embeddings, and gives the same list
    mtimes = {f: os.path.getmtime(out / "cache" / f) for f in os.listdir(out / "cache")}
    curate.main(args + ["--copy-steps", "0", "--threshold", "0.9999", "--levels", "4,2"])
    assert (out / "files.txt").read_text().split() == files
    assert mtimes == {f: os.path.getmtime(out / "cache" / f) for f in os.listdir(out / "cache")}
    # train.py reads the list as it is
    result = train.main(
        tiny_run(
            tmp_path / "t",
            "--data.dataset=folder",
            f"--data.root={out / 'files.txt'}",
            "--run.max_steps=1",
            "--run.eval_at_end=false",
        )
    )
    assert result["step"] == 1
    assert "training" in capsys.readouterr().out


def test_bad_inputs_are_one_line_errors(tmp_path, backbone_run):
    empty = tmp_path / "empty"
    empty.mkdir()
    base = ["--backbone", str(backbone_run), "--out", str(tmp_path / "o")]
    with pytest.raises(DataError, match="does not exist"):
        curate.main([str(tmp_path / "nowhere"), *base])
    with pytest.raises(DataError, match="contains no images"):
        curate.main([str(empty), *base])
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DataError, match="none of the 3 images of pool"):
        curate.main([str(bad), *base])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        curate.main([str(empty), "--backbone", str(tmp_path / "no_run"), "--out", str(tmp_path / "o")])
    with pytest.raises(ConfigError, match="--threshold"):
        curate.main([str(empty), *base, "--threshold", "1.5"])
    with pytest.raises(ConfigError, match="--levels"):
        curate.main([str(empty), *base, "--levels", "8,x"])
    with pytest.raises(ConfigError, match="--balance: expected at least 0, got -3"):
        curate.main([str(empty), *base, "--balance", "-3"])
    listed = tmp_path / "list.txt"
    listed.write_text("a.png\n")
    with pytest.raises(DataError, match=r"list.txt, line 1: .*a.png does not exist"):
        curate.main([str(listed), *base])


def test_near_duplicates_are_what_they_say():
    img = draw_shape(3, 32, 0)[0]
    rng = np.random.default_rng(0)
    a = np.asarray(img, dtype=np.float32)
    for kind in pools.NEAR_DUPLICATES:
        b = np.asarray(pools.near_duplicate(img, kind, rng), dtype=np.float32)
        assert b.shape == a.shape
        if kind == "exact":
            assert (a == b).all()
        elif kind == "flip":
            assert (a[:, ::-1] == b).all()
        else:  # changed, yet close to the original
            assert 0 < np.abs(a - b).mean() < 40, kind
    with pytest.raises(ValueError, match="near-duplicate kind"):
        pools.near_duplicate(img, "rotate", rng)
    assert isinstance(img, Image.Image)


def test_all_pairs_metric_helper_is_consistent():
    # the duplicate benchmark scores pairs inside groups; on groups equal to the truth, both are 1
    truth = [[0, 3], [1, 2, 5]]
    pairs = {tuple(sorted(p)) for g in truth for p in itertools.combinations(g, 2)}
    assert similarity.pair_scores(truth, truth) == (1.0, 1.0) and len(pairs) == 4
    assert similarity.pair_scores([[0, 3, 4]], truth) == (1 / 3, 1 / 4)


def test_sscd_loss_equals_a_loop_over_views():
    from minidino.curation.copy_detection import sscd_loss

    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(38, 13, generator=g, dtype=torch.float64), dim=-1)  # B = 19 pairs
    z[19:] = F.normalize(z[:19] + 0.3 * torch.randn(19, 13, generator=g, dtype=torch.float64), dim=-1)
    got = sscd_loss(z, temperature=0.07, entropy_weight=2.5)
    infonce, entropy = 0.0, 0.0
    for i in range(38):
        partner = (i + 19) % 38
        others = [j for j in range(38) if j != i]
        sims = {j: float(z[i] @ z[j]) for j in others}
        infonce -= math.log(math.exp(sims[partner] / 0.07) / sum(math.exp(s / 0.07) for s in sims.values()))
        nearest_negative = max(s for j, s in sims.items() if j != partner)
        entropy -= math.log(math.sqrt(2 - 2 * nearest_negative))  # distance of unit vectors
    assert float(got["infonce"]) == pytest.approx(infonce / 38, rel=1e-9)
    assert float(got["entropy"]) == pytest.approx(entropy / 38, rel=1e-6)
    assert float(got["loss"]) == pytest.approx((infonce + 2.5 * entropy) / 38, rel=1e-6)
    # views that match their partner exactly and are far from the rest: InfoNCE near 0
    apart = torch.eye(16, dtype=torch.float64)[:8]
    assert float(sscd_loss(torch.cat([apart, apart]))["infonce"]) < 1e-6


def test_random_edits_keep_the_size_and_change_the_image():
    from minidino.curation.copy_detection import descriptor_size, random_edit

    img = draw_shape(5, 32, 0)[0]
    rng = np.random.default_rng(0)
    edited = [np.asarray(random_edit(img, rng), dtype=np.float32) for _ in range(20)]
    a = np.asarray(img, dtype=np.float32)
    assert all(e.shape == a.shape for e in edited)
    assert sum(np.abs(e - a).mean() > 0 for e in edited) >= 15  # 1/32 of the draws edit nothing
    assert (
        descriptor_size(32, 8) == 64 and descriptor_size(224, 16) == 224 and descriptor_size(224, 14) == 224
    )


def test_search_views_give_a_mirror_image_exactly_the_descriptor_of_its_original(backbone_run):
    from minidino.checkpoint import backbone_and_config
    from minidino.curation.copy_detection import CopyDescriptor

    torch.manual_seed(0)
    model = CopyDescriptor(backbone_and_config(str(backbone_run))[0]).eval()
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        single, single_mirrored = model(x), model(x.flip(-1))
    assert (single - single_mirrored).abs().max() > 1e-3  # one view alone is not mirror-invariant
    views, views_mirrored = model.search(x), model.search(x.flip(-1))
    torch.testing.assert_close(views, views_mirrored, atol=1e-5, rtol=0)
    assert torch.allclose(views.norm(dim=-1), torch.ones(3)) and (views[0] - views[1]).abs().max() > 1e-3


def test_command_line_deduplicates_with_a_copy_descriptor_trained_once(tmp_path, backbone_run):
    gt, pool, held = _pool(tmp_path)
    out = tmp_path / "out"
    args = [str(pool), "--backbone", str(backbone_run), "--out", str(out), "--eval-sets", str(held)]
    args += ["--copy-steps", "3", "--copy-batch-size", "8", "--threshold", "0.9999", "--levels", "4,2"]
    report = curate.main(args)
    # exact copies have the same descriptor: the three copies and the two held-out images' copies go
    assert report["stages"] == {"pool": 26, "readable": 25, "deduplicated": 22, "decontaminated": 20}
    assert report["duplicate_feature"] == "copy descriptor (3 steps)"
    trained = os.path.getmtime(out / "cache" / "copy_descriptor.pt")
    curate.main(args)  # the second call reads the descriptor back instead of training it again
    assert os.path.getmtime(out / "cache" / "copy_descriptor.pt") == trained
    state = torch.load(out / "cache" / "copy_descriptor.pt", weights_only=True)
    assert state["proj.weight"].shape[0] == 128 and "backbone.pos_embed" in state


def test_training_the_copy_descriptor_pulls_copies_in_and_pushes_other_images_away(tmp_path, backbone_run):
    from minidino.checkpoint import backbone_and_config
    from minidino.curation.copy_detection import CopyDescriptor, descriptor_size, train_descriptor

    # 40 images and a crop or shift copy (the edits the CLS features miss) of every fourth
    gt = pools.write_shapes_pool(
        str(tmp_path), 40, seed=13, copies={i: 1 for i in range(0, 40, 4)}, kinds=("crop", "shift")
    )
    backbone, cfg = backbone_and_config(str(backbone_run))
    size = descriptor_size(cfg.data.eval_size, cfg.model.patch_size)
    copy_of = {
        i: gt["paths"].index(os.path.join(str(tmp_path), f"{s:06d}.png"))
        for i, (s, k) in enumerate(zip(gt["source"], gt["kind"]))
        if k
    }

    def margin(model) -> float:  # copy-to-original similarity minus that to the nearest other image
        f = embedding.embed(model, gt["paths"], size, 1.0, "cpu")["features"]
        sims = (f @ f.T).fill_diagonal_(-1)
        m = [
            sims[c, o] - sims[c].clone().index_fill_(0, torch.tensor([o]), -1).max()
            for c, o in copy_of.items()
        ]
        return float(torch.stack(m).mean())

    torch.manual_seed(0)
    before = margin(CopyDescriptor(backbone).eval())
    after = margin(train_descriptor(backbone, gt["paths"], size, steps=20, batch_size=16))
    assert after > before + 0.05, (before, after)
