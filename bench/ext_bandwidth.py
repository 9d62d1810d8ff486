"""Bandwidth of the compiled epilogues (``csrc/``) on one chunk of fp32 logits, against the chunk's bytes.

    python -m bench.ext_bandwidth [--device cuda|cpu] [--rows 512] [--vocab 151936] [--reps 20]

For each op: the median time, the bytes it must move at least (row_stats: read the chunk once; full_divergence_:
read the student and source chunks, write the gradient), their rate, and that rate over the device's copy rate
(``copy_`` of the chunk into a buffer: read + write), the memory-bound limit. Prints a markdown table; bench/gpu_check.sh
writes it under $OUT on a GPU. A prediction: row_stats reads the chunk 2-4 times (CUDA: the statistics pass, 1-2
radix-select passes, the selection) or twice (CPU: block maxima, then sum-exp and candidates, the second from L2).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bench.harness import _timed
from dopd_kernels import ext


def _time(fn, device: str, reps: int) -> float:
    """Median of ``reps`` timed calls after a warm-up call (synchronized on CUDA)."""
    fn()
    return statistics.median(_timed(fn, device) for _ in range(reps))


def measure(device: str, rows: int, vocab: int, k: int, reps: int) -> list[tuple[str, float, float]]:
    """(name, seconds, bytes moved at least) for a copy, row_stats, and full_divergence_ (jsd)."""
    g = torch.Generator(device=device).manual_seed(0)
    z = torch.randn(rows, vocab, generator=g, device=device) * 3
    zt = torch.randn(rows, vocab, generator=g, device=device) * 3
    y = torch.randint(0, vocab, (rows,), generator=g, device=device)
    scale = torch.ones(rows, device=device)
    chunk = rows * vocab * 4
    work_s, work_t = z.clone(), zt.clone()

    def divergence() -> None:
        work_s.copy_(z)
        work_t.copy_(zt)
        ext.full_divergence_(work_s, work_t, y, "jsd", 0.5, 1.0, scale)

    copies = _time(lambda: (work_s.copy_(z), work_t.copy_(zt)), device, reps)
    return [
        ("copy (read + write)", _time(lambda: work_s.copy_(z), device, reps), 2 * chunk),
        (f"row_stats (top-{k})", _time(lambda: ext.row_stats(z, y, k), device, reps), chunk),
        ("row_stats (no top-K)", _time(lambda: ext.row_stats(z, y, 0), device, reps), chunk),
        ("full_divergence_ (jsd)", _time(divergence, device, reps) - copies, 3 * chunk),
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args(argv)
    if not ext.is_available() or (args.device == "cuda" and not ext.has_cuda()):
        raise SystemExit("the compiled extension (with kernels for this device) is not built: "
                         "python -m dopd_kernels.ext build")
    results = measure(args.device, args.rows, args.vocab, args.k, args.reps)
    copy_rate = results[0][2] / results[0][1]
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"Epilogue bandwidth, {name}: chunk {args.rows} x {args.vocab} fp32 "
          f"({args.rows * args.vocab * 4 / 2**20:.0f} MiB), torch {torch.__version__}\n")
    print("| op | median | bytes (at least) | GB/s | x copy rate |\n|---|---|---|---|---|")
    for op, seconds, nbytes in results:
        rate = nbytes / seconds
        print(f"| {op} | {seconds * 1e3:.2f} ms | {nbytes / 2**20:.0f} MiB | {rate / 1e9:.0f} | {rate / copy_rate:.2f} |")


if __name__ == "__main__":
    main()
