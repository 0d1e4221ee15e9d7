"""Throughput and peak memory of the full DINO training step, on synthetic crops (data loading timed apart).

    python benchmarks/step.py --preset shapes
    python benchmarks/step.py --preset imagenet --optim.batch_size=128 --steps=20
    python benchmarks/step.py --preset imagenet --profile    # and where a step's time goes (second line)
    python benchmarks/step.py --preset imagenet --syncs      # where one step makes the host wait (a line)
    torchrun --nproc_per_node=1 benchmarks/step.py --preset imagenet --run.parallel=fsdp   # or ddp
    python benchmarks/step.py --preset imagenet --switches=every      # one line per switch of issue 19

One step = teacher forward, student forward/backward, clipping, optimiser step, EMA update and centre
update, exactly `train.train_step`. Prints one JSON line: images/s and peak memory (CUDA allocator peak on
GPU, the process's peak RSS on CPU). With --profile, a second line from torch.profiler over the timed steps:
GPU kernel time per step against the step's wall time (a GPU busy far less than the wall time means the
step waits on the host) and the ten largest kernels and host-side ops by their own time. With --syncs, a
line of `minidino.syncs.HostSyncs` over one step: how many times and where the host reads a value back from
the device (on a CPU: where a GPU run would); the drawing of the iBOT masks is counted apart (in a run the
DataLoader workers draw them). `--optim.fused=true` is the step that reads nothing back. With
--switches=a,b (names in SWITCHES, or `every`), one line per setting, each built afresh in this process:
compare images/s as ratios to the `eager` line of the same call. On a CPU the peak is the process's peak
RSS so far, so only the first line's is its own.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import sys
import time

import torch

from minidino import cli, parallel
from minidino.config import Config, ConfigError
from minidino.dist import cleanup, exit_worker, init_distributed, print0, resolve_device, world_size
from minidino.losses import build_losses
from minidino.masking import step_masks
from minidino.meta_arch import build_student_teacher
from minidino.optim import apply_schedule, build_optimizer
from minidino.schedules import schedules
from minidino.syncs import HostSyncs

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # train.py: not installed
import train  # noqa: E402


def synthetic_crops(cfg: Config, device) -> list[torch.Tensor]:
    b, d = cfg.optim.batch_size, cfg.data
    return [torch.randn(b, 3, d.global_crops_size, d.global_crops_size, device=device) for _ in range(2)] + [
        torch.randn(b, 3, d.local_crops_size, d.local_crops_size, device=device)
        for _ in range(d.local_crops_number)
    ]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def profile_steps(run, steps: int, device: torch.device) -> dict:
    """torch.profiler over `steps` steps: wall and GPU kernel milliseconds per step, and the largest
    kernels and host-side ops by their own (self) time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        run(steps)
        wall = time.perf_counter() - t0
    events = prof.key_averages()

    def top(key):
        ranked = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:10]
        return [[e.key[:80], round(getattr(e, key) / 1000 / steps, 3)] for e in ranked]

    out = {"wall_ms_per_step": round(1000 * wall / steps, 2), "top_host_ops_ms": top("self_cpu_time_total")}
    if device.type == "cuda":
        gpu = sum(e.self_device_time_total for e in events) / 1000 / steps
        out.update(gpu_kernel_ms_per_step=round(gpu, 2), top_kernels_ms=top("self_device_time_total"))
    return out


# Issue 19's switches, each against the present path ("eager") in one process: `--switches=eager,all` or
# `--switches=every` (all rows). A switch that does not apply to a config (ConfigError) prints a skipped line.
SWITCHES = {
    "eager": [],
    "fused_loss": ["--loss.fused_dino_loss=true"],
    "fused_optim": ["--optim.fused=true"],
    "bf16_residual": ["--model.bf16_residual=true"],
    "compile_step": ["--run.compile_step=true"],
    "cuda_graphs": ["--run.compile_step=true", "--run.cuda_graphs=true"],
}
SWITCHES["all"] = [*SWITCHES["fused_loss"], *SWITCHES["fused_optim"], *SWITCHES["bf16_residual"]]
SWITCHES["all"] += SWITCHES["compile_step"]
SWITCHES["all_graphs"] = [*SWITCHES["all"], "--run.cuda_graphs=true"]
# `every` measures the eager step and all switches together first: a run cut off by a time limit (the GPU
# machines allow 10 minutes a command, and each compiled row compiles) has the headline ratio already
EVERY = [
    "eager",
    "all",
    "all_graphs",
    "fused_loss",
    "fused_optim",
    "bf16_residual",
    "compile_step",
    "cuda_graphs",
]
assert sorted(EVERY) == sorted(SWITCHES)


def main(argv: list[str]) -> list[dict]:
    steps, warmup, profile, syncs, switches = 10, 3, False, False, [""]
    rest = []
    for a in argv:
        if a == "--profile":
            profile = True
        elif a == "--syncs":
            syncs = True
        elif a.startswith("--steps="):
            steps = int(a.split("=", 1)[1])
        elif a.startswith("--warmup="):
            warmup = int(a.split("=", 1)[1])
        elif a.startswith("--switches="):
            names = a.split("=", 1)[1]
            switches = EVERY if names == "every" else names.split(",")
            unknown = [n for n in switches if n not in SWITCHES]
            if unknown:
                sys.exit(
                    f"error: --switches: unknown {', '.join(unknown)} (expected {', '.join(SWITCHES)} or every)"
                )
        else:
            rest.append(a)
    results = []
    for name in switches:
        try:
            cfg, _, _ = cli.parse_args(rest + SWITCHES.get(name, []))
        except ConfigError as e:  # a switch that does not apply to this method: a line that says so
            print0(
                json.dumps(
                    {"benchmark": "step", "switch": name, "preset_args": " ".join(rest), "skipped": str(e)}
                )
            )
            continue
        results.append(measure(cfg, name, " ".join(rest), steps, warmup, profile, syncs))
        gc.collect()  # the setting's networks and optimiser state are gone before the next is built
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    cleanup()
    return results


def measure(cfg: Config, switch: str, args: str, steps: int, warmup: int, profile: bool, syncs: bool) -> dict:
    """Build the step of `cfg` from scratch, time `steps` steps after `warmup` (compilation included there),
    print its JSON line (and the --profile / --syncs lines)."""
    device = resolve_device(cfg.run.device)
    torch.manual_seed(0)
    device = init_distributed(device)  # under torchrun (any process count): a process group, this GPU
    torch._dynamo.reset()  # no graph of an earlier setting is reused or counted
    student, teacher = build_student_teacher(cfg)
    student.to(device)
    teacher.to(device)
    student = parallel.wrap(student, [teacher], cfg.run, device)
    losses = parallel.compile_losses(build_losses(cfg, world_size()).to(device), cfg.run)
    opt = build_optimizer(parallel.unwrap(student), cfg.optim)
    crops = synthetic_crops(cfg, device)
    masks = step_masks(cfg, len(crops[0]), step=0, n_crops=len(crops)).to(device)  # as in train.py
    sched = {**schedules(0, 100, 10, cfg.optim, cfg.loss, 1e-4), "lr": 1e-4, "freeze_last_layer": False}
    apply_schedule(opt, sched["lr"], sched["wd"])
    if cfg.optim.fused:  # as train.py's loop: the schedules' floats as device tensors
        sched = train.on_device(sched, {}, device)

    def run(n: int) -> None:
        for _ in range(n):
            train.train_step(student, teacher, teacher, losses, opt, crops, masks, sched, cfg.optim)
        if device.type == "cuda":
            torch.cuda.synchronize()

    run(warmup)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run(steps)
    dt = time.perf_counter() - t0
    peak = (
        torch.cuda.max_memory_allocated()
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's peak so far
    )
    result = {
        "benchmark": "step",
        "switch": switch or "as given",
        "preset_args": args,
        "method": cfg.method,
        "arch": cfg.model.arch,
        "patch_size": cfg.model.patch_size,
        "batch_size": cfg.optim.batch_size,
        "parallel": f"{cfg.run.parallel} x{world_size()}",
        "crops": f"2x{cfg.data.global_crops_size}+{cfg.data.local_crops_number}x{cfg.data.local_crops_size}",
        "device": device_name(device),
        "images_per_s": round(cfg.optim.batch_size * world_size() * steps / dt, 2),  # batch per process
        "step_ms": round(1000 * dt / steps, 2),
        "peak_memory_mb": round(peak / 2**20, 1),
    }
    print0(json.dumps(result))
    if profile:
        print0(
            json.dumps(
                {"benchmark": "step_profile", "switch": result["switch"], **profile_steps(run, steps, device)}
            )
        )
    if syncs:
        with HostSyncs() as drawing:  # in a run, in the DataLoader workers: not the training process's waits
            step_masks(cfg, len(crops[0]), step=1, n_crops=len(crops)).to(device)
        with HostSyncs() as found:
            run(1)
        line = {
            "benchmark": "step_syncs",
            "switch": result["switch"],
            "count": found.count,
            "places": dict(found.places),
        }
        print0(json.dumps({**line, "mask_drawing_in_workers": drawing.count}))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
    exit_worker()  # under torchrun: leave without the interpreter's shutdown (see minidino/dist.py)
