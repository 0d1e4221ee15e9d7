"""minidino/seeds.py: every random stream from one named function, none equal to another."""

import torch

from minidino import seeds


def test_streams_are_deterministic_and_never_share_a_seed():
    """Over a grid of epochs, steps, images and processes, no two (stream, place) pairs get one seed: with
    the old `seed * 1_000_003 + step` formulas the data order of epoch e and the batch views of step e were
    one stream, and the masks of step t those of step t + 7."""
    used = {}
    for seed in (0, 1):
        for i in range(64):
            places = {
                ("data order", i): seeds.stream_seed(seed, "data order", i),
                ("masks", i): seeds.stream_seed(seed, "masks", i),
                **{("image views", i, j): seeds.image_views(seed, i, j) for j in range(8)},
                **{("batch views", i, r): seeds.stream_seed(seed, "batch views", i, r) for r in range(4)},
            }
            for place, value in places.items():
                assert 0 <= value < 2**63
                assert used.setdefault(value, (seed, place)) == (seed, place), (value, used[value], place)
    assert seeds.image_views(0, 3, 5) == seeds.image_views(0, 3, 5)  # the same place, the same seed


def test_named_streams_draw_what_their_seed_gives():
    a = torch.randperm(10, generator=seeds.data_order(0, 2))
    b = torch.randperm(10, generator=torch.Generator().manual_seed(seeds.stream_seed(0, "data order", 2)))
    assert torch.equal(a, b)
    # different epochs, steps and processes give different draws
    assert not torch.equal(a, torch.randperm(10, generator=seeds.data_order(0, 3)))
    x, y = (torch.rand(4, generator=seeds.batch_views(0, 5, r)) for r in (0, 1))
    assert not torch.equal(x, y)
    assert not torch.equal(
        torch.rand(4, generator=seeds.masks(0, 5)), torch.rand(4, generator=seeds.masks(0, 6))
    )


def test_rng_state_round_trip():
    seeds.model_init(3)
    state = seeds.rng_state()
    want = torch.rand(3)
    torch.rand(5)
    seeds.set_rng_state(state)
    assert torch.equal(torch.rand(3), want)
