"""The vocabulary-parallel loss (``routed_loss(..., vocab_group=g)``): communication and per-rank memory,
predicted and measured.

    python -m bench.vocab_parallel                      # prediction at Qwen3 sizes + a CPU run over 1, 2, 4 ranks
    python -m bench.vocab_parallel --ranks 1 2 --n 512 --v 16384

Prediction (``predicted_elements``: exact element counts, compared with ``vocab_parallel.comm.TRAFFIC`` by
the run below and by tests/test_vocab_parallel.py). Per call, elements each rank contributes:
    all-gather  35 (validation row, with check_values) + 4 n (each source's shard log-sum-exp and target logit)
                + (2 + ce) n_full (student shard lse, sampled-token / hard-label logit of each full-softmax row)
                + 2 Kp n_topk (each top-K row's local candidates, values and ids; Kp = max_r min(K, V_r))
    all-reduce  s n_fs (divergence row sums: 1 per full-support row, 2 for JSD) + K n_topk (student logits at
                the merged ids) + Hs n (d hidden, unless reduce_hidden_grad=False leaves it to the caller)
Bytes received per rank: (ranks - 1) x all-gather elements + 2 (ranks - 1) / ranks x all-reduce elements (ring),
times 4 (fp32 exchange for bf16/fp32 inputs). Nothing is O(V): the V-sized work stays on each rank's rows.

Per-rank memory (``predicted_memory``, the torch path, beyond the inputs): V-sized parts fall as 1/ranks,
    5 C V_r x 4 (chunk logits, log-probs, gradient, source chunk) + V_r Hs x (4 + e) (fp32 d W and, for bf16,
    the bf16 copy attach_grads holds) + for bf16 one conversion block of the shard (<= 2^24 x 4 bytes);
N-sized parts do not: 2 n K_r x 12 (both sources' local top-K) + ranks x C x 2 Kp x 4 (one block's
gathered candidates) + n Hs x (4 + e) (d hidden).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Optional

F32 = 4
HEAD_ROW = 11  # validate.py: error flags, shard size, shapes, grad flag, which optional shard tensors
CHECK_ROW = HEAD_ROW + 4 * 6  # + 4 checksums x 6 replicated inputs


def predicted_elements(route_counts: dict[int, int], config, sizes: list[int], hs: int, *, hidden_grad: bool = True,
                       reduce_hidden_grad: bool = True, check_values: bool = True) -> dict[str, int]:
    """Elements this rank contributes to each collective kind in one call (``comm.TRAFFIC``'s keys).

    route_counts: valid tokens per route id; config: the RouteConfig; sizes: the shard sizes (rank order).
    """
    n = sum(route_counts.values())
    k = config.effective_top_k(sum(sizes))
    kp = max(min(k, s) for s in sizes)
    routes = config.routes
    ce = config.ce_weight > 0
    n_full = n if ce else sum(c for rid, c in route_counts.items() if routes[rid].support in ("full", "sampled"))
    n_topk = sum(c for rid, c in route_counts.items() if routes[rid].support == "topk")
    sums = sum(c * (2 if routes[rid].divergence == "jsd" else 1) for rid, c in route_counts.items()
               if routes[rid].support == "full")
    gather = (CHECK_ROW if check_values else HEAD_ROW) + 4 * n + (2 + int(ce)) * n_full + 2 * kp * n_topk
    reduce = sums + k * n_topk + (n * hs if hidden_grad and reduce_hidden_grad else 0)
    return {"all_gather": gather, "all_reduce": reduce}


def bytes_received(elements: dict[str, int], ranks: int, itemsize: int = F32) -> float:
    """Bytes one rank receives for those collectives (ring all-reduce: reduce-scatter + all-gather)."""
    if ranks == 1:
        return 0.0
    return itemsize * ((ranks - 1) * elements.get("all_gather", 0)
                       + 2.0 * (ranks - 1) / ranks * elements.get("all_reduce", 0))


def predicted_memory(n: int, hs: int, ht: int, sizes: list[int], rank: int, *, top_k: int, chunk: int,
                     itemsize: int, sources: int = 2) -> dict[str, float]:
    """Per-rank extra bytes of the torch path, split into the parts that scale with V_r and with n."""
    v_r = sizes[rank]
    k_r = min(top_k, v_r)
    kp = max(min(top_k, s) for s in sizes)
    half = itemsize if itemsize == 2 else 0  # bf16/fp16 inputs: narrower copies beside the fp32 accumulators
    convert = min(v_r * max(hs, ht), 1 << 24) * F32 if half else 0  # chunked_stats.vocab_blocks
    v_sized = 5 * min(chunk, n) * v_r * F32 + v_r * hs * (F32 + half) + convert
    n_sized = sources * n * k_r * (F32 + 8) + len(sizes) * min(chunk, n) * 2 * kp * F32 + n * hs * (F32 + half)
    return {"v_sized": float(v_sized), "n_sized": float(n_sized), "total": float(v_sized + n_sized)}


def even_sizes(vocab: int, ranks: int) -> list[int]:
    """Contiguous shards as Megatron would split (the remainder on the first ranks)."""
    return [vocab // ranks + (r < vocab % ranks) for r in range(ranks)]


# Route fractions of the CPU benchmark's inputs (bench/RESULTS.md, N=2048): LH, LL, HT, HS.
FRACTIONS = {0: 0.16, 1: 0.37, 2: 0.21, 3: 0.26}


def prediction_table(n: int = 16384, hs: int = 2048, ht: int = 4096, vocab: int = 151936, itemsize: int = 2,
                     ranks=(1, 2, 4, 8), emit=print) -> None:
    """The prediction table at Qwen3-1.7B / 8B sizes (bf16, DOPD, K = 128, chunk 256), line by line to ``emit``."""
    from dopd_kernels import ROUTES, RouteConfig

    config = RouteConfig.preset("dopd")
    counts = {rid: round(f * n) for rid, f in FRACTIONS.items()}
    dtype = "bf16" if itemsize == 2 else "fp32"
    fractions = ", ".join(f"{name} {FRACTIONS[rid]}" for rid, name in enumerate(ROUTES))
    emit(f"Prediction, N={n} tokens, Hs={hs}, Ht={ht}, V={vocab}, {dtype}, DOPD, K=128 (route fractions "
         f"{fractions}); per rank:")
    emit()
    emit("| ranks | exchanged / token (d hidden incl.) | without d hidden | per step | V-sized memory "
         "| N-sized memory |")
    emit("|---|---|---|---|---|---|")
    for p in ranks:
        sizes = even_sizes(vocab, p)
        el = predicted_elements(counts, config, sizes, hs)
        el_nohid = predicted_elements(counts, config, sizes, hs, reduce_hidden_grad=False)
        b, b0 = bytes_received(el, p), bytes_received(el_nohid, p)
        mem = predicted_memory(n, hs, ht, sizes, 0, top_k=128, chunk=256, itemsize=itemsize)
        emit(f"| {p} | {b / n / 1024:.1f} KiB | {b0 / n / 1024:.1f} KiB | {b / 2**20:.0f} MiB | "
             f"{mem['v_sized'] / 2**30:.2f} GiB | {mem['n_sized'] / 2**30:.2f} GiB |")


# ----------------------------------------------------------------------------------------- measurement


def _rank_run(rank: int, world: int, init: str, shape: dict, repeats: int, out_dir: str) -> None:
    import torch
    import torch.distributed as dist
    from dopd.distributed import leave_process_group

    from bench.memory import _reset_peak_rss, _status_bytes
    from dopd_kernels import RouteConfig, routed_loss
    from dopd_kernels.vocab_parallel import comm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    n, hs, ht, vocab = shape["n"], shape["hs"], shape["ht"], shape["v"]
    sizes = even_sizes(vocab, world)
    lo = sum(sizes[:rank])
    g = torch.Generator().manual_seed(0)
    w_s = torch.randn(vocab, hs, generator=g) / hs**0.5
    w_t = torch.randn(vocab, ht, generator=g) / ht**0.5
    h_s = torch.randn(n, hs, generator=g)
    h_t = torch.randn(n, ht, generator=g)
    h_p = h_s + 0.5 * torch.randn(n, hs, generator=g)
    ids = torch.randint(0, vocab, (n,), generator=g)
    w_local = w_s[lo:lo + sizes[rank]].clone().requires_grad_()
    t_local = w_t[lo:lo + sizes[rank]].clone()
    del w_s, w_t
    config = RouteConfig.preset("dopd", chunk_size=shape["chunk"])
    h = h_s.clone().requires_grad_()

    def call(group=dist.group.WORLD):
        out = routed_loss(h, w_local, h_t, t_local, h_p, ids, config=config, backend="torch", vocab_group=group)
        out.loss.backward()
        h.grad = w_local.grad = None
        return out

    call()  # warm-up (and the shard sizes' exchange)
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - start)
    plain = []
    for _ in range(repeats if world == 1 else 0):  # the single-process path on the same tensors
        start = time.perf_counter()
        call(None)
        plain.append(time.perf_counter() - start)
    comm.TRAFFIC.clear()
    dist.barrier()
    base = _status_bytes("VmRSS")
    method = "clear_refs" if _reset_peak_rss() else "ru_maxrss"
    out = call()
    peak = _status_bytes("VmHWM") - base
    counts = {rid: int((out.route == rid).sum()) for rid in range(4)}
    torch.save(dict(times=times, plain=plain, traffic=dict(comm.TRAFFIC), counts=counts, peak=peak, method=method,
                    sizes=sizes), os.path.join(out_dir, f"rank{rank}.pt"))
    leave_process_group()


def measure(ranks: int, shape: dict, repeats: int = 3) -> list[dict]:
    """Run the loss on ``ranks`` gloo processes at ``shape``; each rank's times, traffic, counts and peak RSS."""
    import torch
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="dopd-vp-bench-") as tmp:
        mp.spawn(_rank_run, args=(ranks, os.path.join(tmp, "init"), shape, repeats, tmp), nprocs=ranks)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(ranks)]


def main(argv: Optional[list[str]] = None) -> None:
    """Print the prediction at Qwen3 sizes, then measure on this machine (CPU, gloo) next to the prediction."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--hs", type=int, default=256)
    parser.add_argument("--ht", type=int, default=512)
    parser.add_argument("--v", type=int, default=32768)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--md", default=None, help="also write the tables into this markdown file's "
                        "'vocab-parallel' section (bench/RESULTS.md)")
    args = parser.parse_args(argv)
    lines: list[str] = []

    def emit(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    emit("## Vocabulary-parallel loss (`python -m bench.vocab_parallel`)")
    emit()
    prediction_table(emit=emit)
    from dopd_kernels import RouteConfig

    shape = dict(n=args.n, hs=args.hs, ht=args.ht, v=args.v, chunk=args.chunk)
    config = RouteConfig.preset("dopd", chunk_size=args.chunk)
    load = os.getloadavg()[0]
    emit()
    emit(f"Measured {time.strftime('%Y-%m-%d')} (CPU, gloo, 1 thread per rank, fp32, DOPD, K=128), N={args.n}, "
         f"Hs={args.hs}, Ht={args.ht}, V={args.v}; load average before: {load:.1f} on {os.cpu_count()} cores:")
    emit()
    emit("| ranks | time / call (median, slowest rank) | exchanged / token: counted (predicted) | peak extra memory "
         "rank 0: measured (predicted: V-sized + N-sized) |")
    emit("|---|---|---|---|")
    for p in args.ranks:
        res = measure(p, shape, args.repeats)
        t = max(statistics.median(r["times"]) for r in res)
        r0 = res[0]
        predicted = predicted_elements(r0["counts"], config, r0["sizes"], args.hs)
        counted = bytes_received(r0["traffic"], p) / args.n
        mem = predicted_memory(args.n, args.hs, args.ht, r0["sizes"], 0, top_k=128, chunk=args.chunk, itemsize=F32)
        exact = "exact" if r0["traffic"] == predicted else f"counted {r0['traffic']} vs {predicted}"
        plain = f" (no group: {statistics.median(r0['plain']):.3f} s)" if r0["plain"] else ""
        mib = {key: value / 2**20 for key, value in mem.items()}
        emit(f"| {p} | {t:.3f} s{plain} | {counted / 1024:.2f} KiB "
              f"({bytes_received(predicted, p) / args.n / 1024:.2f} KiB, {exact}) | {r0['peak'] / 2**20:.0f} MiB "
              f"({mib['total']:.0f} MiB: {mib['v_sized']:.0f} + {mib['n_sized']:.0f}; {r0['method']}) |")
    emit()
    emit(f"Load average after: {os.getloadavg()[0]:.1f}. Traffic: elements counted in "
         "`vocab_parallel.comm.TRAFFIC`, bytes = fp32 x (ranks - 1) x all-gather + 2 (ranks - 1) / ranks x "
         "all-reduce. Memory: VmHWM - VmRSS of rank 0 around one call after a warm-up (the allocator reuses "
         "freed blocks: small shapes read low). Time: one single-threaded process per rank; with more ranks than "
         "free cores they share the cores, so the time shows no scaling on a busy machine.")
    if args.md:
        from bench.report import merge_section

        existing = open(args.md).read() if os.path.exists(args.md) else ""
        with open(args.md, "w") as fh:
            fh.write(merge_section(existing, "vocab-parallel", "\n".join(lines)))


if __name__ == "__main__":
    main()
