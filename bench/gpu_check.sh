#!/usr/bin/env bash
# CUDA check of the project: the Triton kernels' CUDA tests (tests/test_triton_cuda.py: every preset, CE,
# fp32 / bf16 / fp16 against the torch path, the backend="auto" self-check, a non-current GPU when there are
# two, a CUDA graph capture, fp16 gradients), then the rest of the test suite on the GPU (the interpreter-only
# tests skip themselves; the sm_90 compile sweep of tests/test_triton_compile.py runs as on a CPU machine),
# then the benchmarks at the CUDA sizes (N in {4096, 8192, 16384}, Hs=2048, Ht=4096, V=151936, bf16), then a
# short table. The kernels compile on first use (~125 variants); Triton's cache (TRITON_CACHE_DIR, default
# ~/.triton/cache) keeps them, and the sm_90 sweep fills the same cache entries (same target) as the GPU runs.
#
#   bash bench/gpu_check.sh            # writes under $OUT if set, else bench/out/
#   DOPD_BENCH_SIZES=small bash bench/gpu_check.sh   # one N only (a quicker check)
#
# Outputs: ext_build.log, tests_triton_cuda.log, tests_cuda.log, bench_cuda.log, bench_cuda.json
# (pytest-benchmark), ext_bandwidth.md (the compiled epilogues against the chunk's bytes), RESULTS.md (a copy
# of bench/RESULTS.md with the CUDA section added or replaced: copy it back to bench/ to keep it) and
# results_cuda.png. Exits non-zero if the tests or the benchmarks failed; the benchmarks run either way.
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir="${OUT:-bench/out}"
mkdir -p "$out_dir"

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA device; nothing to do" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee "$out_dir/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
    | tee -a "$out_dir/gpu.txt"

echo "== python -m dopd_kernels.ext build (the compiled extension, CUDA kernels when nvcc is found) =="
python -m dopd_kernels.ext build 2>&1 | tee "$out_dir/ext_build.log"
ext_rc=${PIPESTATUS[0]}

echo "== pytest tests/test_triton_cuda.py (compiled kernels on the GPU) =="
python -m pytest tests/test_triton_cuda.py -q -rs -p no:cacheprovider 2>&1 | tee "$out_dir/tests_triton_cuda.log"
cuda_rc=${PIPESTATUS[0]}

echo "== pytest tests (the rest, CUDA machine) =="
python -m pytest tests -x -q -rs -p no:cacheprovider --ignore=tests/test_triton_cuda.py 2>&1 \
    | tee "$out_dir/tests_cuda.log"
tests_rc=${PIPESTATUS[0]}
[ "$cuda_rc" -ne 0 ] && tests_rc=$cuda_rc

echo "== pytest bench --benchmark-only (sizes: ${DOPD_BENCH_SIZES:-default}) =="
python -m pytest bench --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$out_dir/bench_cuda.json" --benchmark-columns=median,iqr,rounds 2>&1 \
    | tee "$out_dir/bench_cuda.log"
bench_rc=${PIPESTATUS[0]}

echo "== the compiled epilogues' bandwidth on one chunk (bench/ext_bandwidth.py) =="
python -m bench.ext_bandwidth 2>&1 | tee "$out_dir/ext_bandwidth.md"

report_rc=0
if [ -s "$out_dir/bench_cuda.json" ]; then
    # Start from the committed RESULTS.md so its CPU section is kept; the report replaces the CUDA section.
    [ -f bench/RESULTS.md ] && cp bench/RESULTS.md "$out_dir/RESULTS.md"
    python -m bench.report "$out_dir/bench_cuda.json" --md "$out_dir/RESULTS.md" \
        --png "$out_dir/results_cuda.png" --print
    report_rc=$?
fi
echo "gpu_check: ext build rc=$ext_rc, tests rc=$tests_rc, bench rc=$bench_rc, report rc=$report_rc"
[ "$ext_rc" -eq 0 ] && [ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$report_rc" -eq 0 ]
