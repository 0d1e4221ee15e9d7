import copy

import torch

from minidino.ema import ema_update


def _pair():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7))
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.data.normal_()
    return teacher, student


def test_momentum_zero_copies_student():
    teacher, student = _pair()
    ema_update(teacher, student, 0.0)
    for t, s in zip(teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t, s)


def test_momentum_one_keeps_teacher():
    teacher, student = _pair()
    before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, 1.0)
    for t, b in zip(teacher.parameters(), before):
        assert torch.equal(t, b)


def test_momentum_interpolates():
    teacher, student = _pair()
    expected = [0.9 * t + 0.1 * s for t, s in zip(teacher.parameters(), student.parameters())]
    ema_update(teacher, student, 0.9)
    for t, e in zip(teacher.parameters(), expected):
        torch.testing.assert_close(t, e)
