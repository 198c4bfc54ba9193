#!/usr/bin/env bash
# CUDA checks that CPU tests cannot reach (docs/gpu.md records the results):
#   OUT=results-dir LOCALSGD_DATA=/path/to/cifar10 bash benchmarks/gpu/checklist.sh
# 1. environment; 2. quickstart with one worker on CUDA (NCCL); 3. 2 and 4 workers sharing
# one GPU (gloo fallback), an explicit NCCL request in that layout (one-line error), and
# overlapped averaging on CUDA tensors; 4. epoch time against a hand-written loop.
set -u
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
common="wandb.mode=disabled train.progress=false run.resume=false dist.device=cuda"
q=recipes/quickstart.yaml
py=${PYTHON:-python}
run=${TORCHRUN:-torchrun}

step() {  # step NAME TIMEOUT_S COMMAND...: run, keep the log, print its last lines
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "== $name: exit $? in $((SECONDS - t0)) s"
    grep -E "notice|error|final eval|communication" "$out/$name.log" | tail -4
}

{ nvidia-smi; $py -c "import torch; print('torch', torch.__version__, 'cuda',
torch.version.cuda, torch.cuda.get_device_name(), 'nccl', torch.cuda.nccl.version())"; } \
    >"$out/env.log" 2>&1
tail -1 "$out/env.log"
step quickstart_1worker 120 $run --standalone --nproc-per-node=1 torchrun_entry.py $q \
    $common run.dir=/tmp/gpu_q1
step epoch_loader1 150 $py benchmarks/bench_epoch.py $q --epochs 3 --rounds 1 \
    --out "$out/epoch_loader1.json"
step quickstart_2workers 150 $run --standalone --nproc-per-node=2 torchrun_entry.py $q \
    $common run.dir=/tmp/gpu_q2
step nccl_shared_gpu 45 $run --standalone --nproc-per-node=2 torchrun_entry.py $q \
    $common dist.backend=nccl run.dir=/tmp/gpu_nccl
step overlap_2workers 150 $run --standalone --nproc-per-node=2 torchrun_entry.py $q \
    $common sync.overlap_steps=2 run.dir=/tmp/gpu_ov
step local_4workers 120 $run --standalone --nproc-per-node=4 torchrun_entry.py $q \
    $common sync.algorithm=local sync.period=16 train.epochs=2 lr_schedule.milestones=[1] \
    run.dir=/tmp/gpu_q4
step epoch_loader6 120 $py benchmarks/bench_epoch.py $q data.num_workers=6 \
    --epochs 3 --rounds 1 --out "$out/epoch_loader6.json"
for f in "$out"/epoch_*.log; do echo "== $f"; grep -A6 "^| variant" "$f"; done
