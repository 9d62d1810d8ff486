"""Turn ``pytest bench --benchmark-json=results.json`` output into ``bench/RESULTS.md`` and ``bench/results.png``.

    python -m bench.report results.json [more.json ...] [--md bench/RESULTS.md] [--png bench/results.png] [--print]

Several JSON files (e.g. the comparison and the scaling suites run separately) are merged; machine and date
come from the first.

RESULTS.md holds one section per device between ``<!-- bench:<device>:begin -->`` and
``<!-- bench:<device>:end -->`` markers; a run replaces only its own device's section, so CPU runs keep
the GPU section (and the other way round). Everything outside the markers is left as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import defaultdict

from bench.tables import Row, load_rows, section_markdown, short_table

HERE = os.path.dirname(os.path.abspath(__file__))
TITLE = """# Benchmarks of the DOPD routed loss

Produced by `pytest bench --benchmark-only --benchmark-json=results.json` and
`python -m bench.report results.json`; the shapes of each size set are in `bench/shapes.py`. Each device has its own
section below; a new run replaces only its device's section.
"""


def merge_section(existing: str, device: str, body: str) -> str:
    """Replace (or append) the ``device`` section of a RESULTS.md text, keeping everything else."""
    begin, end = f"<!-- bench:{device}:begin -->", f"<!-- bench:{device}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(existing):
        return pattern.sub(lambda _: block, existing)
    base = existing.rstrip() if existing.strip() else TITLE.rstrip()
    return f"{base}\n\n{block}\n"


def plot(rows: list[Row], path: str, title: str) -> None:
    """Four panels: time and memory of every implementation at the comparison sizes, and our scaling in N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    compare = [r for r in rows if r.suite == "compare" and r.mode == "fwdbwd"]
    ns = sorted({r.n for r in compare})
    impls = [i for i in dict.fromkeys(r.impl for r in compare)]
    width = 0.8 / max(len(ns), 1)
    for j, n in enumerate(ns):
        by_impl = {r.impl: r for r in compare if r.n == n}
        xs = [i + j * width for i in range(len(impls))]
        axes[0, 0].bar(xs, [by_impl[i].median if i in by_impl else 0 for i in impls], width, label=f"N={n}")
        axes[0, 1].bar(xs, [by_impl[i].mem / 2**20 if i in by_impl else 0 for i in impls], width, label=f"N={n}")
    for ax, ylabel in ((axes[0, 0], "forward+backward time (s)"), (axes[0, 1], "peak extra memory (MiB)")):
        ax.set_xticks([i + width * (len(ns) - 1) / 2 for i in range(len(impls))])
        ax.set_xticklabels(impls, rotation=30, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.legend()
    # Scaling over N: every fwdbwd point of our paths and the algorithmic floor at the base Hs/Ht/V.
    base = compare[0] if compare else None
    series: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        if r.mode == "fwdbwd" and r.impl in ("torch", "torch+ext", "triton", "floor_alg") and base is not None and (
            r.hs, r.ht, r.v) == (base.hs, base.ht, base.v):
            series[r.impl].append(r)
    for impl, pts in series.items():
        pts = sorted({p.n: p for p in pts}.values(), key=lambda p: p.n)
        color = {"floor_alg": "C0", "torch": "C1", "triton": "C2", "torch+ext": "C3"}[impl]
        axes[1, 0].plot([p.n for p in pts], [p.median for p in pts], "o-", label=impl, color=color)
        if impl == "floor_alg":  # its memory is unchunked GEMM outputs, not an algorithm's: time only
            continue
        axes[1, 1].plot([p.n for p in pts], [p.mem / 2**20 for p in pts], "o-", label=impl, color=color)
        # dashed: exactly proportional to N through the largest point, for the eye
        n_max, t_max = pts[-1].n, pts[-1].median
        axes[1, 0].plot([p.n for p in pts], [t_max * p.n / n_max for p in pts], "--", color="gray", lw=0.8,
                        label=f"{impl}: proportional to N")
    for ax, ylabel in ((axes[1, 0], "time (s)"), (axes[1, 1], "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        if ax is axes[1, 0]:
            ax.set_yscale("log")
        else:  # linear from 0, so that "nearly flat in N" reads as flat
            ax.set_ylim(bottom=0)
        ax.set_xlabel("N tokens")
        ax.set_ylabel(ylabel)
        ax.set_title(f"scaling in N ({ylabel.split(' (')[0]})")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Read the benchmark JSON, write the markdown section and the plot, optionally print a short table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+", help="output(s) of pytest --benchmark-json")
    parser.add_argument("--md", default=os.path.join(HERE, "RESULTS.md"), help="markdown file to update")
    parser.add_argument("--png", default=os.path.join(HERE, "results.png"), help="plot to write")
    parser.add_argument("--print", action="store_true", help="also print a short table to stdout")
    args = parser.parse_args(argv)

    docs = []
    for path in args.json:
        with open(path) as fh:
            docs.append(json.load(fh))
    data = dict(docs[0], benchmarks=[b for d in docs for b in d.get("benchmarks", [])])
    rows = load_rows(data)
    if not rows:
        raise SystemExit(f"{args.json}: no benchmark with extra_info (run with --benchmark-only)")
    device = rows[0].device
    png_rel = os.path.relpath(args.png, os.path.dirname(os.path.abspath(args.md)))
    body = section_markdown(data, rows, png_rel)
    sources = " ".join(os.path.relpath(p) for p in args.json)
    body += f"\nGenerated by `python -m bench.report {sources}`.\n"
    existing = open(args.md).read() if os.path.exists(args.md) else ""
    with open(args.md, "w") as fh:
        fh.write(merge_section(existing, device, body))
    plot(rows, args.png, f"dopd benchmarks, {device}, {data.get('datetime', '')[:10]}")
    if args.print:
        print(short_table(rows))
    print(f"wrote {args.md} ({device} section) and {args.png}")


if __name__ == "__main__":
    main()
