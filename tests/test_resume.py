"""Resume and checkpoints (train.py, minidino/checkpoint.py): a resumed run, killed or stopped, computes
exactly the steps of an uninterrupted one; a bad run never replaces its last good checkpoint."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import train
from conftest import tiny_run
from minidino import cli
from minidino.config import ConfigError
from minidino.losses import DINOLoss
from minidino.weights import load_checkpoint


def _log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def test_resume_equals_uninterrupted(tmp_path):
    train.main(tiny_run(tmp_path / "a"))
    train.main(tiny_run(tmp_path / "b", "--run.max_steps=2"))
    assert [r["step"] for r in _log(tmp_path / "b")] == [1, 2]
    train.main(["--resume", str(tmp_path / "b"), "--run.max_steps=0"])
    a, b = _log(tmp_path / "a"), _log(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit-identical losses
    ta, tb = (load_checkpoint(str(tmp_path / d))["teacher"] for d in "ab")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def _killed_after_checkpoint(monkeypatch, step: int):
    """Make the run die right after writing its checkpoint of `step`, as a SIGKILL there would: nothing of
    the process outlives it but the run folder."""
    from minidino.checkpoint import RunFolder

    class Killed(BaseException):
        pass

    save = RunFolder.save

    def save_then_die(self, state, last=False):
        save(self, state, last)
        if state["step"] == step:
            raise Killed

    monkeypatch.setattr(RunFolder, "save", save_then_die)
    return Killed


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(["--model.drop_path=0.3"], id="dino-mask"),
        pytest.param(
            ["--method=dinov2", "--model.drop_path=0.3", "--data.augment=pil", "--data.num_workers=2"],
            id="dinov2-workers",
        ),
        pytest.param(
            ["--model.drop_path=0.3", "--optim.accum_steps=2", "--loss.koleo_group=8"], id="dino-accumulation"
        ),
        pytest.param(  # RoPE with its coordinate jitter; the Gram teacher taken at step 2, killed at step 4
            ["--method=dinov3", "--model.drop_path=0.3", "--gram.weight=1", "--gram.start_epoch=1"]
            + [
                "--gram.refresh_every=2",
                "--optim.accum_steps=2",
                "--loss.koleo_group=8",
                "--model.rope_jitter=1.5",
            ],
            id="dinov3-gram",
        ),
    ],
)
def test_killed_and_resumed_with_stochastic_depth_equals_uninterrupted(tmp_path, monkeypatch, extra):
    """Stochastic depth draws on the device inside the step; its stream is seeded per (step, process)
    (`seeds.step_draws`), so a run killed after a checkpoint and resumed draws what the uninterrupted run
    drew: bit-identical losses and weights, with workers and with accumulation (DINOv2: `subset`, DINO's
    cases: `mask`)."""
    args = [*extra, "--optim.epochs=3", "--run.eval_at_end=false"]
    train.main(tiny_run(tmp_path / "a", *args))
    killed = _killed_after_checkpoint(monkeypatch, step=4 if "--gram.weight=1" in extra else 2)
    with pytest.raises(killed):
        train.main(tiny_run(tmp_path / "b", *args))
    monkeypatch.undo()
    train.main(["--resume", str(tmp_path / "b")])
    a, b = _log(tmp_path / "a"), _log(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit-identical losses
    ca, cb = (load_checkpoint(str(tmp_path / d)) for d in "ab")
    for part in ("student", "teacher"):
        assert all(torch.equal(ca[part][k], cb[part][k]) for k in ca[part]), part
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert all(torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) for k in sa)
    if "--gram.weight=1" in extra:  # the Gram loss ran from step 2 with the teacher the checkpoint kept
        assert [("loss_gram" in r) for r in b] == [False, False, True, True, True, True]
        assert torch.equal(
            ca["losses"]["gram"]["teacher.cls_token"], cb["losses"]["gram"]["teacher.cls_token"]
        )


def _jpeg_folder(root, n=32):
    rng = np.random.default_rng(0)
    root.mkdir()
    for i in range(n):  # a few sizes, so that the boxes are drawn on each image's own size
        h, w = (40, 56) if i % 2 else (64, 48)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"{i:02d}.jpg")
    return str(root)


@pytest.mark.parametrize("data", ["shapes", "jpeg_folder"])
def test_resume_equals_uninterrupted_with_the_crops_pipeline(tmp_path, data):
    """--data.augment=crops: uint8 crops and parameter tables drawn per (seed, epoch, image) in the workers,
    colour on the device; a resumed run is bit-identical, on in-memory images and on JPEG files."""
    extra = ["--data.augment=crops", "--run.eval_at_end=false"]
    if data == "jpeg_folder":
        extra += ["--data.dataset=folder", f"--data.root={_jpeg_folder(tmp_path / 'jpegs')}"]
    train.main(tiny_run(tmp_path / "a", *extra))
    train.main(tiny_run(tmp_path / "b", *extra, "--run.max_steps=3"))
    train.main(["--resume", str(tmp_path / "b"), "--run.max_steps=0"])
    a, b = _log(tmp_path / "a"), _log(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    ta, tb = (load_checkpoint(str(tmp_path / d))["teacher"] for d in "ab")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_one_data_loader_serves_all_epochs(tmp_path, monkeypatch):
    """The DataLoader (and its worker processes) is made once per run, not once per epoch."""
    import minidino.loader

    made = []

    class Counted(minidino.loader.DataLoader):
        def __init__(self, *args, **kwargs):
            made.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(minidino.loader, "DataLoader", Counted)
    train.main(tiny_run(tmp_path / "a", "--run.eval_at_end=false", "--data.num_workers=1"))
    assert [r["epoch"] for r in _log(tmp_path / "a")] == [0, 0, 1, 1] and len(made) == 1


def test_finished_run_resumed_does_nothing(tmp_path, capsys):
    train.main(tiny_run(tmp_path / "a"))
    before = os.path.getmtime(tmp_path / "a" / "checkpoint.pt")
    assert train.main(["--resume", str(tmp_path / "a")]) == {"step": 4}
    assert "already finished" in capsys.readouterr().out
    assert os.path.getmtime(tmp_path / "a" / "checkpoint.pt") == before


def test_existing_run_folder_is_not_overwritten(tmp_path):
    train.main(tiny_run(tmp_path / "a", "--run.max_steps=1", "--run.eval_at_end=false"))
    with pytest.raises(ConfigError, match=r"already holds a checkpoint: continue it with --resume"):
        train.main(tiny_run(tmp_path / "a"))


def test_checkpoint_from_another_architecture_is_a_clear_error(tmp_path):
    train.main(tiny_run(tmp_path / "a", "--run.max_steps=1", "--run.eval_at_end=false"))
    with pytest.raises(ValueError, match=r"does not match this architecture"):
        train.main(["--resume", str(tmp_path / "a"), "--model.arch=vit_tiny"])


def test_non_finite_loss_stops_with_step_and_keeps_checkpoint(tmp_path, monkeypatch):
    train.main(tiny_run(tmp_path / "a", "--run.max_steps=2", "--run.eval_at_end=false"))
    saved = (tmp_path / "a" / "checkpoint.pt").read_bytes()
    real = DINOLoss.forward
    monkeypatch.setattr(DINOLoss, "forward", lambda self, s, t: real(self, s, t) * float("nan"))
    with pytest.raises(
        train.NonFiniteLoss, match=r"loss is nan at step 2: stopping; the last good checkpoint"
    ):
        train.main(["--resume", str(tmp_path / "a"), "--run.max_steps=0"])
    assert (tmp_path / "a" / "checkpoint.pt").read_bytes() == saved


def test_a_diverged_update_at_an_epoch_end_never_replaces_the_last_good_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "a"
    _blow_up_after_step(monkeypatch, at_call=4)  # step 4 ends epoch 2; the checkpoint of step 2 is kept
    with pytest.raises(train.NonFiniteLoss) as e:
        train.main(tiny_run(run, "--optim.epochs=3", "--run.eval_at_end=false"))
    assert str(e.value).startswith("the update of step 4 gives loss nan: stopping;")
    assert str(e.value).endswith(f"the last good checkpoint {run / 'checkpoint.pt'} (step 2) is intact")
    assert load_checkpoint(str(run))["step"] == 2
    monkeypatch.undo()  # the checkpoint resumes with finite losses
    train.main(["--resume", str(run), "--run.eval_at_end=false"])
    rows = _log(run)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_a_diverged_update_before_any_checkpoint_says_so(tmp_path, monkeypatch):
    _blow_up_after_step(monkeypatch, at_call=2)
    with pytest.raises(
        train.NonFiniteLoss, match=r"step 2 gives loss nan: stopping; no checkpoint was written"
    ):
        train.main(tiny_run(tmp_path / "a", "--run.eval_at_end=false"))
    assert not (tmp_path / "a" / "checkpoint.pt").exists()


def test_a_run_with_no_step_does_not_claim_a_checkpoint(tmp_path, capsys):
    train.main(tiny_run(tmp_path / "a", "--optim.epochs=0", "--run.eval_at_end=false"))
    out = capsys.readouterr().out
    assert "no training step to run (--optim.epochs=0): nothing was saved" in out and "saved /" not in out
    assert not (tmp_path / "a" / "checkpoint.pt").exists()


def test_a_refused_resume_leaves_config_json_as_it_was(tmp_path):
    train.main(tiny_run(tmp_path / "a", "--run.max_steps=1", "--run.eval_at_end=false"))
    before = (tmp_path / "a" / "config.json").read_bytes()
    with pytest.raises(ValueError, match=r"does not match this architecture"):
        train.main(["--resume", str(tmp_path / "a"), "--model.arch=vit_tiny"])
    assert (tmp_path / "a" / "config.json").read_bytes() == before
    train.main(
        ["--resume", str(tmp_path / "a"), "--run.max_steps=0", "--run.eval_at_end=false"]
    )  # still resumes
    assert load_checkpoint(str(tmp_path / "a"))["step"] == 4


def test_resume_of_a_folder_without_checkpoint_says_it_starts_over(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    cfg, _, _ = cli.parse_args(tiny_run(tmp_path / "a", "--run.max_steps=1", "--run.eval_at_end=false"))
    from minidino.config import save_json

    save_json(cfg, tmp_path / "a" / "config.json")
    train.main(["--resume", str(tmp_path / "a")])
    assert "no checkpoint there yet, so the run starts at step 0" in capsys.readouterr().out
    assert load_checkpoint(str(tmp_path / "a"))["step"] == 1


def test_fused_non_finite_loss_stops_at_the_log_step_with_its_step_and_keeps_checkpoint(
    tmp_path, monkeypatch
):
    train.main(tiny_run(tmp_path / "a", "--run.max_steps=2", "--run.eval_at_end=false", "--optim.fused=true"))
    saved = (tmp_path / "a" / "checkpoint.pt").read_bytes()
    real = DINOLoss.forward
    monkeypatch.setattr(DINOLoss, "forward", lambda self, s, t: real(self, s, t) * float("nan"))
    with pytest.raises(
        train.NonFiniteLoss,
        match=r"loss is not finite at step 2 \(updates skipped since\): stopping; the last good checkpoint",
    ):
        train.main(["--resume", str(tmp_path / "a"), "--run.max_steps=0", "--run.log_every=2"])
    assert (tmp_path / "a" / "checkpoint.pt").read_bytes() == saved


def _blow_up_after_step(monkeypatch, at_call: int):
    """train_step as usual, but after its `at_call`-th call every weight of the student and of the EMA
    teacher is multiplied by 1e20: finite, so that step's own loss was fine, yet the next loss is not."""
    real, calls = train.train_step, []

    def step(student, teacher, ema_target, *args):
        out = real(student, teacher, ema_target, *args)
        calls.append(1)
        if len(calls) == at_call:
            with torch.no_grad():
                for p in [*student.parameters(), *ema_target.parameters()]:
                    p.mul_(1e20)
        return out

    monkeypatch.setattr(train, "train_step", step)
