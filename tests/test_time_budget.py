"""--run.minutes (minidino/time_budget.py): the plan's arithmetic, schedules fitted to the planned length as if
it had been asked for, the measured steps leaving no trace, a run ending within its budget, and resume
keeping the plan."""

import json
import os
import time

import pytest
import torch
from test_resume import _log

import train
from conftest import tiny_run
from minidino import cli, time_budget
from minidino.config import Config
from minidino.schedules import schedules
from minidino.weights import load_checkpoint


def test_steps_in_budget_is_what_is_left_at_the_measured_rate():
    # 10 min less 3 %: 582 s; less 30 s spent, 60 s of evaluation, 12 s of checkpoints: 480 s at 2 steps/s
    assert time_budget.steps_in_budget(10, 30.0, 2.0, 60.0, 12.0, margin=0.03) == 960
    assert time_budget.steps_in_budget(1, 0.0, 0.5, 0.0, 0.0, margin=0.0) == 30
    assert time_budget.steps_in_budget(0.1, 30.0, 5.0, 10.0, 0.0) == 1  # nothing left: still one step
    cfg = Config()
    cfg.optim.epochs, cfg.run.minutes = 10, 30
    # 10 checkpoints of (0.5 s save + 0.25 s check) and 31 plots of PLOT_S
    assert time_budget.loop_seconds(cfg, 0.5, 0.25) == pytest.approx(7.5 + 31 * time_budget.PLOT_S)


def _cfg(**optim) -> Config:
    cfg = Config()
    cfg.optim.epochs, cfg.optim.warmup_epochs, cfg.optim.freeze_last_layer = 10, 2, 1
    cfg.loss.warmup_teacher_temp_epochs = 3
    for k, v in optim.items():
        setattr(cfg.optim, k, v)
    return cfg


def _all(cfg: Config) -> list[dict]:
    total = cfg.optim.epochs * cfg.optim.epoch_steps
    return [schedules(s, total, cfg.optim.epoch_steps, cfg.optim, cfg.loss, 1e-3) for s in range(total)]


def test_fitted_schedules_are_those_of_the_length_asked_for():
    """1,234 steps over 10 epochs: epochs of 123 steps, every warm-up and cosine end at the step the run
    `--optim.epoch_steps=123` has them."""
    fitted = time_budget.fit_schedules(_cfg(), 1234)
    assert (fitted.optim.epochs, fitted.optim.epoch_steps) == (10, 123)
    asked = _cfg(epoch_steps=123)
    assert _all(fitted) == _all(asked)
    s = _all(fitted)
    assert s[245]["lr"] < s[246]["lr"] == pytest.approx(1e-3)  # warm-up: 2 epochs = 246 steps
    assert s[368]["teacher_temp"] < s[369]["teacher_temp"] == fitted.loss.teacher_temp  # 3 epochs
    assert s[122]["freeze_last_layer"] and not s[123]["freeze_last_layer"]  # 1 epoch
    assert s[-1]["lr"] == pytest.approx(fitted.optim.min_lr) and s[-1]["momentum"] == pytest.approx(1.0)
    assert _cfg().optim.epoch_steps == 0  # the input is left as it was


def test_fewer_steps_than_epochs_scale_the_options_counted_in_epochs():
    fitted = time_budget.fit_schedules(_cfg(), 7)
    o, lo = fitted.optim, fitted.loss
    assert (o.epochs, o.epoch_steps) == (7, 1)
    # 7 / 10 of each: warm-up 2 -> 1.4 -> 1, teacher warm-up 3 -> 2.1 -> 2, frozen head 1 -> 0.7 -> 1 (kept on)
    assert (o.warmup_epochs, lo.warmup_teacher_temp_epochs, o.freeze_last_layer) == (1, 2, 1)
    assert o.freeze_backbone_epochs == 1  # the default 1 epoch stays on
    assert time_budget.fit_schedules(_cfg(freeze_backbone_epochs=0), 7).optim.freeze_backbone_epochs == 0


def _plan(run_dir) -> dict:
    with open(os.path.join(run_dir, "plan.json")) as fh:
        return json.load(fh)


BUDGET = ["--data.n_train=256", "--optim.batch_size=16", "--optim.epochs=4", "--run.log_every=5"]


def test_a_run_with_a_budget_of_seconds_ends_within_it(tmp_path):
    """A 20-second budget: the run (measurement, training, final k-NN) ends within it plus a little, and
    uses most of it (the plan scaled the run up from its nominal 64 steps)."""
    minutes = 1 / 3
    clock = time.perf_counter()
    out = train.main(tiny_run(tmp_path / "r", *BUDGET, f"--run.minutes={minutes}"))
    wall = time.perf_counter() - clock
    plan = _plan(tmp_path / "r")
    assert wall < minutes * 60 + 3, f"{wall:.1f} s for a {minutes * 60:.0f} s budget (plan: {plan})"
    assert wall > 0.6 * minutes * 60, (
        f"only {wall:.1f} s of a {minutes * 60:.0f} s budget used (plan: {plan})"
    )
    assert plan["steps"] == plan["epochs"] * plan["epoch_steps"] == out["step"] > 64
    cfg = cli.read_run_config(str(tmp_path / "r"))
    assert cfg.optim.epoch_steps == plan["epoch_steps"] and "knn_top1" in out


def test_measured_steps_leave_no_trace_and_resume_keeps_the_plan(tmp_path, monkeypatch):
    """A planned run killed after its first checkpoint and resumed (measuring nothing, keeping the plan)
    equals the run asked for with the plan's --optim.epoch_steps: bit-identical losses and weights, so the
    measured steps, undone, left no trace (stochastic depth on: its draws are part of what is undone)."""
    from minidino.checkpoint import RunFolder

    def run(name, *extra):
        return tiny_run(tmp_path / name, "--run.eval_at_end=false", "--model.drop_path=0.2", *extra)

    class Killed(BaseException):
        pass

    def save_then_die(self, state, last=False):
        save(self, state, last)
        raise Killed

    save = RunFolder.save
    monkeypatch.setattr(RunFolder, "save", save_then_die)
    with pytest.raises(Killed):
        train.main(run("a", "--run.minutes=0.1"))
    monkeypatch.undo()
    plan = _plan(tmp_path / "a")
    monkeypatch.setattr(time_budget, "measure_steps", lambda *a: pytest.fail("a resumed run re-measured"))
    train.main(["--resume", str(tmp_path / "a")])
    assert _plan(tmp_path / "a") == plan and plan["epoch_steps"] > 1
    train.main(run("b", f"--optim.epoch_steps={plan['epoch_steps']}"))
    a, b = _log(tmp_path / "a"), _log(tmp_path / "b")
    assert len(a) == plan["steps"] and [r["loss"] for r in a] == [r["loss"] for r in b]
    wa, wb = (load_checkpoint(str(tmp_path / d))["student"] for d in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cifar10_without_a_gpu_is_its_cpu_recipe_and_says_so(monkeypatch, capsys):
    from minidino.presets import cifar10, cifar10_cpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg, _, _ = cli.parse_args(["--preset", "cifar10", "--optim.lr=2e-3"])
    assert "no GPU here: --preset cifar10 runs its CPU recipe, cifar10_cpu" in capsys.readouterr().out
    want = cifar10_cpu()
    want.optim.lr = 2e-3
    assert cfg == want and cfg.model != cifar10().model
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cli.parse_args(["--preset", "cifar10"])[0] == cifar10()  # a GPU: the one-GPU recipe
    assert "no GPU" not in capsys.readouterr().out
    assert cli.parse_args(["--preset", "cifar10", "--run.device=cpu"])[0].model == cifar10_cpu().model
