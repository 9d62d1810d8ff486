"""Peak extra memory of one implementation call.

CUDA: ``torch.cuda.max_memory_allocated`` after a reset, in the benchmark process.
CPU: torch's CPU allocator hands large blocks back to the OS and the benchmark process keeps freed heap
from earlier tests, so an in-process RSS reading is unreliable. Instead a fresh child process
(``python -m bench.memory``) loads the saved inputs, builds the implementation, warms up, records its
RSS as the baseline, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``, Linux) and runs the
call once; the answer is ``VmHWM - baseline``. Without clear_refs it falls back to ``ru_maxrss`` (which
then also counts the warm-up: the method is recorded next to the number).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
from typing import Callable

import torch

from bench.impls import build_runner
from bench.inputs import load_inputs

CHILD_TIMEOUT_S = 900


def cuda_peak_extra_bytes(run: Callable[[], object], setup: Callable[[], None]) -> int:
    """Peak bytes allocated on the current CUDA device by ``run()`` beyond what was live before it."""
    setup()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - base)


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # "5": reset the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def _tiny_warmup() -> None:
    """Start MKL/OpenMP thread pools and their buffers, so they are not billed to the measured call."""
    a = torch.randn(256, 256)
    (a @ a).logsumexp(-1).sum()
    a.topk(8, dim=-1)


def child_measure(inputs_path: str, impl: str, mode: str, n_ht: int, full_warmup: bool) -> dict:
    """Run in the child process: load, build, warm up, reset the peak counter, run once, report."""
    x = load_inputs(inputs_path)
    run = build_runner(impl, mode, x, n_ht)
    _tiny_warmup()
    if full_warmup:  # torch.compile: compile outside the measured call
        run()
    x.zero_grads()
    gc.collect()
    try:
        base = _status_bytes("VmRSS")
        reset = _reset_peak_rss()
    except (OSError, KeyError):
        base, reset = 0, False
    if reset:
        run()
        peak, method = _status_bytes("VmHWM"), "VmHWM-after-clear_refs"
    else:
        run()
        peak, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss"
    return {"peak_extra_bytes": int(peak - base), "baseline_rss_bytes": int(base), "mem_method": method}


def cpu_peak_extra_bytes(inputs_path: str, impl: str, mode: str, n_ht: int, full_warmup: bool) -> dict:
    """Measure ``impl`` in a fresh child process (see the module docstring); returns the child's dict."""
    cmd = [
        sys.executable, "-m", "bench.memory", "--inputs", inputs_path, "--impl", impl, "--mode", mode,
        "--n-ht", str(n_ht),
    ] + (["--full-warmup"] if full_warmup else [])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, env=env, cwd=root)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    """Child entry point: print one JSON line with the peak extra bytes."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--impl", required=True)
    parser.add_argument("--mode", required=True)
    parser.add_argument("--n-ht", type=int, required=True)
    parser.add_argument("--full-warmup", action="store_true")
    args = parser.parse_args(argv)
    print(json.dumps(child_measure(args.inputs, args.impl, args.mode, args.n_ht, args.full_warmup)))


if __name__ == "__main__":
    main()
