"""The reports of ``dopd compare``: per-label statistics, ``compare.json``, ``compare.md``, ``compare.png``.

Statistics over the seeds of one label (failed runs are counted and listed, never averaged):
- accuracy before and after on the split scored over the steps (``eval_split``: heldout unless asked),
  and the gain; every split's accuracy after (``heldout``, ``ood``, ``prior``, ...);
- forgetting: the initial student's ``prior`` accuracy minus the run's (a skill distillation never trains);
- stability over steps: per run, the standard deviation of the held-out accuracy over the evaluations
  of the second half of training, and the largest drop between two consecutive evaluations (averaged
  over seeds); stability over seeds is the standard deviation of the final accuracy;
- route fractions and per-route losses over the last tenth of the steps.
Standard deviations are sample standard deviations (n - 1); with one seed they are 0.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional, Sequence

ROUTE_NAMES = ("LH", "LL", "HT", "HS")
#: The label every other one is compared with in compare.md (when it was run).
BASELINE = "vanilla_opd"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value; NaN for none)."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def _step_stability(curve: Sequence[Sequence[float]]) -> tuple[float, float]:
    """(std of the accuracy over the second half of the evaluations, largest drop between two evaluations)."""
    accs = [a for _, a in curve]
    if len(accs) < 2:
        return 0.0, 0.0
    last_step = curve[-1][0]
    late = [a for s, a in curve if s >= last_step / 2]
    drop = max(0.0, max(a - b for a, b in zip(accs, accs[1:])))
    return mean_std(late)[1] if len(late) > 1 else 0.0, drop


def summarize(runs: Sequence[dict[str, Any]], reference: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One entry per label, in first-seen order: counts, mean/std of every reported quantity."""
    labels: list[str] = []
    for r in runs:
        if r["label"] not in labels:
            labels.append(r["label"])
    prior_before = reference.get("student_before", {}).get("prior")
    out: dict[str, dict[str, Any]] = {}
    for label in labels:
        mine = [r for r in runs if r["label"] == label]
        ok = [r for r in mine if r["status"] == "ok"]
        entry: dict[str, Any] = {"runs": len(mine), "ok": len(ok), "failed": [r["name"] for r in mine if r not in ok],
                                 "seeds": [r["seed"] for r in ok]}
        # before / after / gain: on the split scored over the steps (``eval_split``, normally heldout).
        for key, values in (("before", [r["accuracy_before"] for r in ok]),
                            ("after", [r["accuracy_after"] for r in ok]),
                            ("gain", [r["accuracy_after"] - r["accuracy_before"] for r in ok])):
            entry[key] = mean_std(values)
        for split in sorted({s for r in ok for s in r["splits_after"]}):
            entry[f"{split}_after"] = mean_std([r["splits_after"].get(split) for r in ok])
        if prior_before is not None and "prior_after" in entry:
            entry["forgetting"] = mean_std([prior_before - r["splits_after"]["prior"] for r in ok])
        stab = [_step_stability(r["accuracy_over_steps"]) for r in ok]
        entry["step_std"] = mean_std([s for s, _ in stab])
        entry["worst_drop"] = mean_std([d for _, d in stab])
        entry["route_fractions"] = {k: mean_std([r["route_fractions"][k] for r in ok])[0] for k in ROUTE_NAMES}
        entry["route_losses"] = {k: mean_std([r["route_losses"][k] for r in ok])[0] for k in ROUTE_NAMES}
        entry["curve"] = _mean_curve(ok)
        entry["wall_s"] = mean_std([r["wall_s"] for r in ok])[0]
        out[label] = entry
    return out


def _mean_curve(ok: Sequence[dict[str, Any]]) -> list[list[float]]:
    """[[step, mean, std], ...] over the steps every run evaluated at."""
    if not ok:
        return []
    steps = sorted(set.intersection(*[{s for s, _ in r["accuracy_over_steps"]} for r in ok]))
    by_run = [dict((s, a) for s, a in r["accuracy_over_steps"]) for r in ok]
    return [[s, *mean_std([d[s] for d in by_run])] for s in steps]


def _fmt(ms: Optional[tuple[float, float]], digits: int = 3) -> str:
    if ms is None or math.isnan(ms[0]):
        return "-"
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    """compare.md: the setting, the table (mean ± std over seeds), the differences to the baseline, failures."""
    m, cfg, summ = report["machine"], report["config"], report["summary"]
    lines = [
        f"# dopd compare: {report['task']} ({report['task_size']})", "",
        f"{report['date']}; {m['processor']}, {m['cpus_usable']} usable cores, {report['jobs']} runs at a time; "
        f"load average {m['load_avg'][0]:.1f} at the start, {m.get('load_avg_end', [float('nan')])[0]:.1f} at the end; "
        f"wall {report['wall_s'] / 60:.1f} min, {report['cpu_s'] / 60:.1f} CPU-min in the runs.",
        f"Every run: {cfg['max_steps']} steps x {cfg['prompts_per_step']} prompts x {cfg['num_generations']} samples, "
        f"lr {cfg['learning_rate']}, self model {cfg['self_model']} unless the label says; the same data, teacher "
        f"and initial student. Splits: " + ", ".join(f"{k} {v}" for k, v in report["splits"].items()) + ".",
        "Teacher without the hint: " + ", ".join(f"{k} {v:.3f}" for k, v in report["reference"]["teacher"].items())
        + "; student before: " + ", ".join(f"{k} {v:.3f}" for k, v in report["reference"]["student_before"].items())
        + ".", "",
    ]
    curve = report.get("eval_split", "heldout")
    extra = sorted({k[:-6] for e in summ.values() for k in e if k.endswith("_after")} - {curve})
    head = ["run", "ok", f"{curve} after", "gain"] + [f"{s} after" for s in extra]
    head += ["forgetting"] if any("forgetting" in e for e in summ.values()) else []
    head += ["step std", "worst drop"] + [f"{r}" for r in ROUTE_NAMES]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, e in summ.items():
        row = [label, f"{e['ok']}/{e['runs']}", _fmt(e["after"]), _fmt(e["gain"])]
        row += [_fmt(e.get(f"{s}_after")) for s in extra]
        row += [_fmt(e.get("forgetting"))] if "forgetting" in head else []
        row += [_fmt(e["step_std"]), _fmt(e["worst_drop"])]
        row += [f"{e['route_fractions'][r]:.2f}" if e["ok"] else "-" for r in ROUTE_NAMES]
        lines.append("| " + " | ".join(row) + " |")
    steps = sorted({c[0] for e in summ.values() for c in e["curve"]})
    if steps:
        lines += ["", f"{curve} accuracy over steps (mean ± std over seeds):", "",
                  "| run | " + " | ".join(str(s) for s in steps) + " |", "|" + "---|" * (len(steps) + 1)]
        for label, e in summ.items():
            at = {c[0]: c for c in e["curve"]}
            lines.append(f"| {label} | " + " | ".join(
                f"{at[s][1]:.3f} ± {at[s][2]:.3f}" if s in at else "-" for s in steps) + " |")
    lines += ["", "Route columns: fraction of tokens per route over the last tenth of the steps (the routing is "
              "computed for every preset). Per-route loss over the last tenth of the steps: "]
    for label, e in summ.items():
        if e["ok"]:
            lines.append(f"- {label}: " + ", ".join(f"{r} {e['route_losses'][r]:.3f}" for r in ROUTE_NAMES))
    base = summ.get(BASELINE)
    if base and base["ok"]:
        lines += ["", f"Accuracy after ({curve}), difference to {BASELINE} (a difference counts when it exceeds "
                  "twice the larger of the two standard deviations, with at least 2 seeds each):"]
        for label, e in summ.items():
            if label == BASELINE or not e["ok"]:
                continue
            diff = e["after"][0] - base["after"][0]
            bar = 2 * max(e["after"][1], base["after"][1])
            verdict = "yes" if abs(diff) > bar and min(e["ok"], base["ok"]) >= 2 else "no"
            lines.append(f"- {label}: {diff:+.3f} (2 x std = {bar:.3f}; beyond the noise: {verdict})")
    failed = [r for r in report["runs"] if r["status"] != "ok"]
    if failed:
        lines += ["", "Failed runs:"] + [f"- {r['name']}: {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: str) -> str:
    """compare.png: held-out accuracy over steps (mean, band +- std over seeds) and the splits after training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = report["summary"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    for label, e in summ.items():
        if not e["curve"]:
            continue
        steps = [c[0] for c in e["curve"]]
        mean = [c[1] for c in e["curve"]]
        std = [c[2] for c in e["curve"]]
        (line,) = ax.plot(steps, mean, marker="o", ms=3, label=f"{label} (n={e['ok']})")
        ax.fill_between(steps, [a - s for a, s in zip(mean, std)], [a + s for a, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.2)
    curve = report.get("eval_split", "heldout")
    ax.axhline(report["reference"]["teacher"].get(curve, float("nan")), color="k", ls="--", lw=1,
               label="teacher, no hint")
    ax.set(title=f"{report['task']}: {curve} accuracy (band: ± std over seeds)", xlabel="step", ylabel="accuracy",
           ylim=(0, 1))
    ax.legend(fontsize=8)
    splits = [curve] + sorted({k[:-6] for e in summ.values() for k in e if k.endswith("_after")} - {curve})
    labels = [k for k, e in summ.items() if e["ok"]]
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        e = summ[label]
        vals = [e.get(f"{s}_after", (float("nan"), 0.0)) for s in splits]
        bx.bar([j + i * width for j in range(len(splits))], [v[0] for v in vals], width,
               yerr=[v[1] for v in vals], capsize=2, label=label)
    bx.set_xticks([j + 0.4 - width / 2 for j in range(len(splits))], splits)
    bx.set(title="after training (± std over seeds)", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_reports(report: dict[str, Any], output_dir: str) -> None:
    """Write compare.json, compare.md and compare.png into ``output_dir``."""
    with open(os.path.join(output_dir, "compare.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    with open(os.path.join(output_dir, "compare.md"), "w") as fh:
        fh.write(markdown(report))
    plot(report, os.path.join(output_dir, "compare.png"))
