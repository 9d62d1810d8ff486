"""Markdown tables of the benchmark report: comparison, statistics pass, scaling fits, predictions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

RATIO_TO = (("floor_5gemm", "x 5-GEMM"), ("floor_alg", "x alg. floor"), ("torch", "x torch"),
            ("liger_compiled", "x Liger (compiled)"), ("liger", "x Liger (eager)"))


@dataclass
class Row:
    """One benchmark: its parameters (from extra_info) and its timing statistics."""

    impl: str
    mode: str
    suite: str
    n: int
    hs: int
    ht: int
    v: int
    dtype: str
    device: str
    median: float
    iqr: float
    rounds: int
    mem: float
    mem_method: str
    pred_bytes: float
    pred_flops: float
    pred_note: str
    n_ht: int
    load: tuple[float, float]
    fractions: dict[str, float] = field(default_factory=dict)

    @property
    def key(self) -> tuple:
        """The problem this row ran on (rows with equal keys ran on the same tensors)."""
        return (self.mode, self.n, self.hs, self.ht, self.v, self.dtype)


def load_rows(data: dict) -> list[Row]:
    """Rows of a pytest-benchmark JSON document (benchmarks without our extra_info are ignored)."""
    rows = []
    for b in data.get("benchmarks", []):
        e, s = b.get("extra_info", {}), b["stats"]
        if "impl" not in e:
            continue
        rows.append(Row(
            impl=e["impl"], mode=e["mode"], suite=e["suite"], n=e["n"], hs=e["hs"], ht=e["ht"], v=e["v"],
            dtype=e["dtype"], device=e["device"], median=s["median"], iqr=s["iqr"], rounds=s["rounds"],
            mem=e["peak_extra_bytes"], mem_method=e.get("mem_method", ""), pred_bytes=e["pred_bytes"],
            pred_flops=e["pred_flops"], pred_note=e.get("pred_note", ""), n_ht=e.get("n_ht", 0),
            load=(e.get("loadavg_before", float("nan")), e.get("loadavg_after", float("nan"))),
            fractions={k: v for k, v in e.items() if k.startswith("frac/")},
        ))
    return rows


def fmt_bytes(b: float) -> str:
    """Bytes as MiB / GiB."""
    return f"{b / 2**30:.2f} GiB" if abs(b) >= 2**30 else f"{b / 2**20:.1f} MiB"


def fmt_time(t: float) -> str:
    """Seconds as s or ms."""
    return f"{t:.3f} s" if t >= 1 else f"{t * 1e3:.1f} ms"


def _ratio(row: Row, rows_by_key: dict, impl: str) -> str:
    other = rows_by_key.get((row.key, impl))
    return f"{row.median / other.median:.2f}" if other else "-"


def _fit(xs: list[float], ys: list[float]) -> Optional[tuple[float, float, float]]:
    """Least-squares line y = a + b x: (a, b, R^2); None with fewer than 3 points."""
    if len(xs) < 3:
        return None
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    b, a = np.polyfit(x, y, 1)
    resid = y - (a + b * x)
    ss = float(((y - y.mean()) ** 2).sum())
    return a, b, (1.0 - float((resid**2).sum()) / ss) if ss > 0 else 1.0


def comparison_table(rows: list[Row], mode: str) -> list[str]:
    """One table per problem size: every implementation with time, memory, prediction and ratios."""
    by_key = {(r.key, r.impl): r for r in rows}
    out = []
    keys = sorted({r.key for r in rows if r.suite == "compare" and r.mode == mode}, key=lambda k: k[1])
    ratio_cols = [(i, name) for i, name in RATIO_TO if any((k, i) in by_key for k in keys)]
    for key in keys:
        group = [r for r in rows if r.key == key and r.suite == "compare"]
        first = group[0]
        out.append(f"**N={first.n}, Hs={first.hs}, Ht={first.ht}, V={first.v}, {first.dtype}**"
                   f" (HT-routed tokens: {first.n_ht}; route fractions "
                   + ", ".join(f"{k[5:]} {v:.2f}" for k, v in first.fractions.items()) + ")")
        out.append("")
        out.append("| impl | median | IQR | rounds | peak extra memory | predicted memory | GFLOP/s "
                   + "".join(f"| {name} " for _, name in ratio_cols) + "|")
        out.append("|---" * (7 + len(ratio_cols)) + "|")
        for r in sorted(group, key=lambda r: r.median):
            gflops = r.pred_flops / r.median / 1e9
            out.append(
                f"| {r.impl} | {fmt_time(r.median)} | {fmt_time(r.iqr)} | {r.rounds} | {fmt_bytes(r.mem)} | "
                f"{fmt_bytes(r.pred_bytes)} | {gflops:.0f} "
                + "".join(f"| {_ratio(r, by_key, i)} " for i, _ in ratio_cols) + "|"
            )
        out.append("")
    return out


def scaling_lines(rows: list[Row]) -> list[str]:
    """Linear fits over N (time and memory) and over V (memory) for our paths and the algorithmic floor."""
    out = []
    compare = [r for r in rows if r.suite == "compare" and r.mode == "fwdbwd"]
    if not compare:
        return out
    base = compare[0]
    out += ["### Scaling in N (forward+backward; Hs, Ht, V as above)", "",
            "| impl | N | median | peak extra memory | memory / token |", "|---|---|---|---|---|"]
    fits = []
    for impl in ("torch", "torch+ext", "triton", "floor_alg"):
        pts = sorted({r.n: r for r in rows if r.impl == impl and r.mode == "fwdbwd"
                      and (r.hs, r.ht, r.v) == (base.hs, base.ht, base.v)}.values(), key=lambda r: r.n)
        for r in pts:
            out.append(f"| {impl} | {r.n} | {fmt_time(r.median)} | {fmt_bytes(r.mem)} | {r.mem / r.n / 1024:.1f} KiB |")
        t_fit = _fit([r.n for r in pts], [r.median for r in pts])
        m_fit = _fit([r.n for r in pts], [r.mem for r in pts])
        if t_fit and impl.startswith("floor"):  # the floor's memory is its unchunked GEMM outputs: no claim
            fits.append(f"- {impl}: time = {t_fit[0]:.3f} s + {t_fit[1] * 1e3:.3f} ms/token (R^2 {t_fit[2]:.3f}).")
        elif t_fit and m_fit:
            fits.append(
                f"- {impl}: time = {t_fit[0]:.3f} s + {t_fit[1] * 1e3:.3f} ms/token (R^2 {t_fit[2]:.3f}); memory = "
                f"{fmt_bytes(m_fit[0])} + {m_fit[1] / 1024:.1f} KiB/token (R^2 {m_fit[2]:.3f}); an N x V fp32 "
                f"tensor would add {4 * base.v / 1024:.0f} KiB/token, so the slope is "
                f"{m_fit[1] / (4 * base.v):.2f} of one."
            )
    out += [""] + fits + [""]
    vrows = sorted((r for r in rows if r.suite in ("scaling_v", "compare") and r.mode == "fwdbwd"
                    and r.impl in ("torch", "torch+ext", "triton") and r.n == _v_sweep_n(rows)),
                   key=lambda r: (r.impl, r.v))
    if len({r.v for r in vrows}) > 1:
        out += [f"### Scaling in V (forward+backward, N={vrows[0].n})", "",
                "| impl | V | median | peak extra memory | memory / vocabulary row |", "|---|---|---|---|---|"]
        for r in vrows:
            out.append(f"| {r.impl} | {r.v} | {fmt_time(r.median)} | {fmt_bytes(r.mem)} | {r.mem / r.v / 1024:.2f} KiB |")
        for impl in sorted({r.impl for r in vrows}):
            pts = [r for r in vrows if r.impl == impl]
            fit = _fit([r.v for r in pts], [r.mem for r in pts])
            if fit:
                r0 = pts[0]
                grads = 4 * r0.hs * 2 + 4 * r0.hs  # fp32 accumulator + dtype gradient, per vocabulary row (upper)
                out.append(
                    f"- {impl}: memory = {fmt_bytes(fit[0])} + {fit[1] / 1024:.2f} KiB per vocabulary row "
                    f"(R^2 {fit[2]:.3f}) = {fit[1] / 4:.0f} fp32 values per row; the V x Hs gradients account for "
                    f"up to {grads / 4:.0f}, the rest ({max(fit[1] - grads, 0) / 4:.0f}) is chunk buffers "
                    f"(chunk = 256 tokens), independent of N={r0.n}."
                )
        out.append("")
    return out


def _mem_method_text(method: str) -> str:
    return {
        "VmHWM-after-clear_refs": "peak RSS of a fresh child process running the call once after a warm-up, "
        "minus its RSS before the call (`/proc/self/clear_refs` resets the peak)",
        "ru_maxrss": "peak RSS of a fresh child process (ru_maxrss, includes loading the inputs) minus its RSS "
        "before the call",
        "cuda.max_memory_allocated": "`torch.cuda.max_memory_allocated` after a reset, minus the memory allocated before",
    }.get(method, method)


def _v_sweep_n(rows: list[Row]) -> int:
    ns = [r.n for r in rows if r.suite == "scaling_v"]
    return ns[0] if ns else -1


def section_markdown(data: dict, rows: list[Row], png: str) -> str:
    """The whole device section: machine, date, tables, fits, prediction notes."""
    mi = data.get("machine_info", {})
    cpu = mi.get("cpu", {})
    loads = [x for r in rows for x in r.load]
    device = rows[0].device
    lines = [
        f"## {device.upper()}: {cpu.get('brand_raw', mi.get('processor', '?'))}, {cpu.get('count', '?')} cores",
        "",
        f"Run {data.get('datetime', '?')} on {mi.get('node', '?')} ({mi.get('system', '')} {mi.get('release', '')}),"
        f" Python {mi.get('python_version', '?')}, torch {data.get('benchmarks', [{}])[0].get('extra_info', {}).get('torch_version', '?')}."
        f" Load average (1 min) during the run: {min(loads):.1f} to {max(loads):.1f}"
        + (" -- the machine was shared, so times are inflated and noisy; the ratios between implementations"
           " measured in the same minutes are more meaningful than absolute times." if max(loads) > 1.5 * (cpu.get("count") or 1) else ".")
        + f" Peak extra memory: {_mem_method_text(rows[0].mem_method)}.",
        "",
        f"![benchmark plot]({png})",
        "",
        "### Forward + backward, same tensors",
        "",
        "Ratios are time / the other implementation's time on the same tensors (below 1: faster). GFLOP/s uses the "
        "FLOPs the algorithm needs (predicted), not the FLOPs the implementation executes.",
        "",
    ]
    lines += comparison_table(rows, "fwdbwd")
    if any(r.mode == "stats" for r in rows):
        lines += ["### Statistics pass alone (self + teacher target log-prob, top-K, routing)", ""]
        lines += comparison_table(rows, "stats")
    lines += scaling_lines(rows)
    lines += dtype_lines(rows)
    notes = sorted({(r.impl, r.mode, r.pred_note) for r in rows})
    lines += ["### What the memory predictions count", ""]
    lines += [f"- {impl} ({mode}): {note}" for impl, mode, note in notes]
    return "\n".join(lines) + "\n"


def dtype_lines(rows: list[Row]) -> list[str]:
    """The PyTorch path on one shape with float32 and bfloat16 inputs (suite ``dtypes``)."""
    drows = sorted((r for r in rows if r.suite == "dtypes"), key=lambda r: (r.n, r.v, r.dtype != "float32"))
    if not drows:
        return []
    lines = ["### The PyTorch path: bfloat16 inputs beside float32", "",
             "Same values (bf16 rounded), same routes. *Heads* is the size of the inputs' two output projections "
             "(a full fp32 copy of bf16 heads would add 2x that); the predicted memory counts one 64 MiB "
             "converted block for bf16.", "",
             "| dtype | N | Hs | Ht | V | heads | median | peak extra memory | predicted memory |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in drows:
        itemsize = 2 if r.dtype in ("bfloat16", "float16") else 4 if r.dtype == "float32" else 8
        heads = r.v * (r.hs + r.ht) * itemsize
        lines.append(f"| {r.dtype} | {r.n} | {r.hs} | {r.ht} | {r.v} | {fmt_bytes(heads)} | {fmt_time(r.median)} | "
                     f"{fmt_bytes(r.mem)} | {fmt_bytes(r.pred_bytes)} |")
    return lines + [""]


def short_table(rows: list[Row]) -> str:
    """A compact plain-text table (for a terminal): impl, mode, N, V, time, memory, x alg. floor."""
    by_key = {(r.key, r.impl): r for r in rows}
    lines = [f"{'impl':15s} {'mode':6s} {'N':>6s} {'V':>7s} {'median':>10s} {'peak mem':>11s} {'x alg floor':>11s}"]
    for r in sorted(rows, key=lambda r: (r.mode, r.v, r.n, r.median)):
        lines.append(f"{r.impl:15s} {r.mode:6s} {r.n:6d} {r.v:7d} {fmt_time(r.median):>10s} {fmt_bytes(r.mem):>11s} "
                     f"{_ratio(r, by_key, 'floor_alg'):>11s}")
    return "\n".join(lines)
