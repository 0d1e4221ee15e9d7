import torch

from minidino.syncs import HostSyncs


def test_host_syncs_finds_every_kind_of_read_back_and_nothing_else():
    x = torch.randn(7)
    with HostSyncs() as found:
        x.sum().item()  # 1
        x[x > 0]  # 2: boolean-mask indexing
        if (x > 10).any():  # 3: bool(tensor)
            pass
        x.tolist()  # 4
        x[x < -5] = 0  # 5: boolean-mask assignment
        torch.repeat_interleave(torch.ones(3), torch.tensor([1, 2, 3]))  # 6: output size from the values
        torch.nonzero(x)  # 7
        # none of these reads a value back
        torch.repeat_interleave(torch.ones(3), torch.tensor([1, 2, 3]), output_size=6)
        x[torch.tensor([0, 2])]
        (x * 2).sum(), torch.where(x > 0, x, 0)
    assert found.count == 7 and len(found.places) == 7
    assert all(place.startswith("tests/test_syncs.py:") for place in found.places)
    assert torch.Tensor.tolist is not None and x.tolist() == x.tolist()  # restored on exit
