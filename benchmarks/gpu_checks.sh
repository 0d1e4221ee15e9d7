#!/usr/bin/env bash
# Every GPU check of minidino in one command, because device time is short. Sections run in the order given
# (default: all): tests (the `triton` tests: kernels against their references on the GPU), attention (benchmarks/attention.py),
# graphs (the same, quick, with fwd+bwd also replayed from CUDA graphs: wall time without the host's share),
# overhead (benchmarks/attention_overhead.py: host time against GPU kernel time per attention call),
# step (full DINO training step, imagenet preset, SDPA vs Triton vs packed Triton, each with its profile line),
# switches (the step's speed switches against the eager step: fused loss, fused AdamW, bf16 residual stream,
# compiled step, CUDA graphs, all; DINO and DINOv2 at batch 64 and 128, a markdown table at the end),
# parallel (the same step plain, DDP and FSDP2 on one GPU), drop_path, data (the crops and PIL pipelines from
# JPEG files with 14 workers, beside the step on the same preset: which of the two limits a run), cifar10 (the
# one-GPU CIFAR-10 run: the archive extracted, --preset cifar10 with a 10-minute budget, k-NN and images/s;
# not part of the default list, as it takes 10 minutes of the device: name it).
#
#   bash benchmarks/gpu_checks.sh                 # everything; logs in $OUT (or ./gpu_logs)
#   bash benchmarks/gpu_checks.sh tests attention # just these
set -u
out=${OUT:-gpu_logs}
mkdir -p "$out"
export PYTHONUNBUFFERED=1  # with grep --line-buffered: each line reaches its log when it is printed, so a
# command cut off by a time limit keeps every row measured until then
sections=${*:-tests attention graphs overhead step switches parallel drop_path data}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
for s in $sections; do
  echo "== $s ($(date +%T))"
  case $s in
    tests)
      # every `triton` test runs on the GPU there (one tile config per kernel: correctness; the benchmark autotunes)
      MINIDINO_ATTN_AUTOTUNE=0 timeout 420 python -m pytest -q -rs -m triton tests/test_attention.py tests/test_drop_path.py 2>&1 | tee "$out/tests.txt" ;;
    attention)
      TRITON_PRINT_AUTOTUNING=1 timeout 300 python benchmarks/attention.py 2>&1 | tee "$out/attention.jsonl" ;;
    graphs)
      timeout 300 python benchmarks/attention.py --quick --graphs 2>&1 | tee "$out/graphs.jsonl" ;;
    overhead)
      timeout 200 python benchmarks/attention_overhead.py 2>&1 | grep --line-buffered '^{' | tee "$out/overhead.jsonl" ;;
    step)
      for opts in "--model.attn_impl=sdpa" "--model.attn_impl=triton" "--model.attn_impl=triton --model.pack_crops=true"; do
        # shellcheck disable=SC2086
        timeout 150 python benchmarks/step.py --preset imagenet --optim.batch_size=64 --steps=10 --profile $opts 2>&1 | grep --line-buffered '^{' | tee -a "$out/step.jsonl"
      done ;;
    switches)
      # issue 19's table: the present eager step against each switch and all of them, DINO and DINOv2, batch
      # 128 and 64 (SWITCH_BATCHES), images/s and peak GiB, one process per (batch, method), batch 128 first
      # and in each process eager and all first (the goal), so a cut-off run has those; the compiled
      # rows compile during their 3 warm-up steps
      for b in ${SWITCH_BATCHES:-128 64}; do
        for method in dino dinov2; do
          # shellcheck disable=SC2086
          timeout 480 python benchmarks/step.py --preset imagenet --method=$method --optim.batch_size=$b \
            --model.attn_impl=sdpa --steps=10 --switches=${SWITCHES:-every} ${SWITCH_ARGS:-} 2>&1 | grep --line-buffered '^{' | tee -a "$out/switches.jsonl"
        done
      done
      python benchmarks/table.py "$out/switches.jsonl" | tee "$out/switches.md" ;;
    parallel)
      # one GPU: the plain path, DDP and FSDP2 (each a process group of 1), imagenet preset, synthetic crops
      for mode in none ddp fsdp; do
        timeout 150 python -m torch.distributed.run --standalone --nproc_per_node=1 benchmarks/step.py --preset imagenet \
          --optim.batch_size=64 --steps=10 --run.parallel=$mode 2>&1 | tail -1 | tee -a "$out/parallel.jsonl"
      done ;;
    drop_path)
      timeout 200 python benchmarks/drop_path.py --quick 2>&1 | tee "$out/drop_path.jsonl" ;;
    data)
      # 3000 ImageNet-sized JPEGs made on the spot (~1 min), then images/s delivered to the GPU, batch 128
      # (DATA_* / STEP_ARGS: smaller settings, e.g. for the test of this section on a CPU)
      jpegs=${JPEGS:-/tmp/minidino_jpegs}
      [ -d "$jpegs" ] || timeout 300 python benchmarks/data.py --make-jpegs "$jpegs" "${DATA_JPEGS:-3000}" | tee -a "$out/data.jsonl"
      # shellcheck disable=SC2086
      timeout 300 python benchmarks/data.py --preset imagenet --data.root="$jpegs" --optim.batch_size=${DATA_BATCH:-128} \
        --workers=${DATA_WORKERS:-14} --pipelines=crops,pil --batches=8 ${DATA_ARGS:-} 2>&1 | grep --line-buffered '^{' | tee -a "$out/data.jsonl"
      # shellcheck disable=SC2086
      timeout 150 python benchmarks/step.py --preset imagenet ${STEP_ARGS:---optim.batch_size=128 --steps=10} 2>&1 | grep --line-buffered '^{' | tee -a "$out/data.jsonl" ;;
    cifar10)
      # CIFAR10_TAR: the archive (ImageFolder JPEGs); CIFAR10_MINUTES: the budget; CIFAR10_ARGS: more options
      data=${CIFAR10_DATA:-data}
      [ -d "$data/cifar10/train" ] || { mkdir -p "$data" && tar -xzf "${CIFAR10_TAR:-../shared/data/cifar10-jpeg.tar.gz}" -C "$data"; }
      # shellcheck disable=SC2086
      python benchmarks/budget.py --minutes="${CIFAR10_MINUTES:-10}" --out="$out/cifar10_runs" --preset cifar10 \
        --data.root="$data/cifar10" ${CIFAR10_ARGS:-} 2>"$out/cifar10.err" | tee -a "$out/cifar10.jsonl" ;;
    *)
      echo "unknown section $s (expected tests, attention, graphs, overhead, step, switches, parallel, drop_path, data, cifar10)" ;;
  esac
done
echo "== done ($(date +%T))"
