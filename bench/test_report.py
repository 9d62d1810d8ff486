"""Self-checks of the report and the cost model (no benchmark fixture: skipped under --benchmark-only).

Run with ``pytest bench/test_report.py``; a second or two, no heavy tensors.
"""

from __future__ import annotations

import json

import pytest

from bench.predict import gemm_flops, predicted_bytes, predicted_flops
from bench.report import main as report_main
from bench.report import merge_section
from bench.shapes import BenchShape, resolve_size_set, suite_shapes
from bench.tables import load_rows

SHAPE = BenchShape(n=2048, hs=512, ht=1024, v=32768, dtype="float32", device="cpu")


def test_merge_section_replaces_only_its_device() -> None:
    text = merge_section("", "cuda", "gpu numbers")
    text = merge_section(text, "cpu", "old cpu numbers")
    text = merge_section(text + "\nhand-written notes\n", "cpu", "new cpu numbers")
    assert "gpu numbers" in text and "new cpu numbers" in text and "hand-written notes" in text
    assert "old cpu numbers" not in text
    assert text.count("<!-- bench:cpu:begin -->") == 1


def test_cost_model_orders_the_implementations() -> None:
    n_ht = 400
    flops = {impl: predicted_flops(impl, "fwdbwd", SHAPE, n_ht) for impl in ("naive", "liger", "floor_alg", "torch")}
    five = 4 * gemm_flops(2048, 512, 32768) + gemm_flops(2048, 1024, 32768)
    assert flops["naive"] == pytest.approx(five)
    assert flops["floor_alg"] == flops["torch"] < flops["liger"] < flops["naive"]
    # Our path's memory bound has no N x V term: 4x the tokens adds far less than one N x V fp32 tensor.
    grow = predicted_bytes("torch", "fwdbwd", SHAPE, n_ht) - predicted_bytes(
        "torch", "fwdbwd", BenchShape(512, 512, 1024, 32768, "float32", "cpu"), n_ht)
    assert grow < 0.1 * (2048 - 512) * 32768 * 4
    assert predicted_bytes("naive", "fwdbwd", SHAPE, n_ht) > 7 * 2048 * 32768 * 4


def test_size_sets() -> None:
    assert resolve_size_set(None) in ("small", "default", "large")
    with pytest.raises(ValueError):
        resolve_size_set("huge")
    cpu = suite_shapes("cpu", "default")
    assert [s.n for s in cpu.compare] == [512, 2048] and cpu.compare[0].v == 32768
    cuda = suite_shapes("cuda", "default")
    assert [s.n for s in cuda.compare] == [4096, 8192, 16384] and cuda.compare[0].dtype == "bfloat16"


def _bench(impl: str, n: int, median: float, mem: float, suite: str = "compare") -> dict:
    info = dict(impl=impl, mode="fwdbwd", suite=suite, n=n, hs=512, ht=1024, v=32768, dtype="float32", device="cpu",
                peak_extra_bytes=mem, mem_method="VmHWM-after-clear_refs", pred_bytes=mem / 2, pred_flops=1e12,
                pred_note="note", n_ht=n // 5, loadavg_before=1.0, loadavg_after=1.0, torch_version="x")
    info["frac/HT"] = 0.2
    return {"extra_info": info, "stats": {"median": median, "iqr": 0.0, "rounds": 2}}


def test_report_end_to_end(tmp_path) -> None:
    benches = [_bench("floor_5gemm", 2048, 2.0, 1e9), _bench("floor_alg", 2048, 1.0, 5e8),
               _bench("liger_compiled", 2048, 3.0, 9e8), _bench("torch+ext", 2048, 1.2, 2e8)]
    benches += [_bench("torch", n, 1.5 * n / 2048, 1e8 + 1e4 * n, "scaling_n" if n != 2048 else "compare")
                for n in (512, 1024, 2048, 4096)]
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"benchmarks": benches, "machine_info": {"cpu": {"count": 2}}, "datetime": "2026"}))
    md, png = tmp_path / "R.md", tmp_path / "r.png"
    md.write_text("<!-- bench:cuda:begin -->\nkept\n<!-- bench:cuda:end -->\n")
    report_main([str(path), "--md", str(md), "--png", str(png)])
    text = md.read_text()
    assert "kept" in text and png.stat().st_size > 0
    # torch at N=2048: 1.5 s against the 2.0 s five-GEMM floor, the 1.0 s algorithmic floor, itself and the
    # 3.0 s Liger run; torch+ext's 1.2 s against the same.
    torch_row = next(line for line in text.splitlines() if line.startswith("| torch | 1.500 s"))
    assert "| 0.75 | 1.50 | 1.00 | 0.50 |" in torch_row
    ext_row = next(line for line in text.splitlines() if line.startswith("| torch+ext | 1.200 s"))
    assert "| 0.60 | 1.20 | 0.80 | 0.40 |" in ext_row
    assert "R^2 1.000" in text  # exactly linear synthetic scaling
    assert "bfloat16 inputs beside float32" not in text  # no dtypes suite in this run: no table
    assert len(load_rows(json.loads(path.read_text()))) == len(benches)


def test_dtype_table(tmp_path) -> None:
    benches = [_bench("torch", 512, 2.0, 1e9, "dtypes"), _bench("torch", 512, 2.5, 8e8, "dtypes")]
    benches[1]["extra_info"]["dtype"] = "bfloat16"
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"benchmarks": benches, "machine_info": {"cpu": {"count": 2}}, "datetime": "2026"}))
    md = tmp_path / "R.md"
    report_main([str(path), "--md", str(md), "--png", str(tmp_path / "r.png")])
    lines = md.read_text().split("bfloat16 inputs beside float32", 1)[1].splitlines()
    rows = [line for line in lines if line.startswith("| float32") or line.startswith("| bfloat16")]
    assert rows[0].startswith("| float32 | 512 | 512 | 1024 | 32768 | 192.0 MiB | 2.000 s | 953.7 MiB")
    assert rows[1].startswith("| bfloat16 | 512 | 512 | 1024 | 32768 | 96.0 MiB | 2.500 s | 762.9 MiB")
