"""Every kernel variant the Triton path really launches compiles for Hopper (sm_90), without a GPU.

``tests/_triton_launches.py`` runs the launcher over every preset, CE on and off, custom route tables,
bf16 / fp16 / fp32, biases, the two-pass statistics mode, with and without gradients, a few shapes and
soft-capped models (their own kernel variants), with the GPU tile sizes, and hands each launch to Triton's own launcher in warm-up mode for an sm_90
target: Triton binds the real specializations (16-divisibility, strides equal to 1) and compiles each
unique variant once (PTX, then its bundled ptxas). Then, per variant: it compiled to a cubin; its shared
memory fits Hopper's 227 KB; GEMM tiles in bf16 / fp16 use wgmma (a 32-row tile would silently fall back
to mma.sync; fp32 operands are IEEE fp32 by design, no tensor cores); offsets computed from strides are
64-bit in the TTIR; the rows kernel orders its scalar reads before the in-place gradient sweep by a
barrier; the soft-cap variants are all there and the identity ones carry none of their code. Runs in a
subprocess (tests/conftest.py turns the interpreter on here), compiling in 2 threads. Cold, the 157
variants (126 before soft-caps) took 7.4 min with 2 compile threads and 8.1 min serially (Triton 3.9, a
2-core machine at load 7-8, 2026-11-30: no idle core for the second thread; Triton's LLVM step and ptxas
release the GIL, so a quiet machine gains more); the 126 took 5.5 min (3.9) to 8.5 min (3.6) on a less
busy day. Triton's on-disk cache (~/.triton/cache) makes later runs ~1.5 min.
"""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).with_name("_triton_launches.py")
KERNELS = {"_stats_kernel", "_mm_kernel", "_rows_kernel", "_bias_grad_kernel", "_gather_logits_kernel",
           "_scatter_grad_kernel"}
#: Compile threads (Triton's AsyncCompileMode; 1 compiles serially, as a real launch does).
WORKERS = 2


@pytest.fixture(scope="module")
def launch_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("sm90") / "variants.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    try:
        done = subprocess.run([sys.executable, str(SCRIPT), str(out), str(WORKERS)], env=env, capture_output=True,
                              text=True, timeout=1500, cwd=root)
    except subprocess.TimeoutExpired:
        pytest.fail("the launch set took over 25 minutes to compile for sm_90")
    if done.returncode != 0 and "ptxas" in done.stderr and "not found" in done.stderr.lower():
        pytest.skip("triton's bundled ptxas is missing on this machine")
    assert done.returncode == 0, done.stderr[-4000:]
    data = json.loads(out.read_text())
    variants = data["variants"]
    kinds = Counter(v["kernel"] for v in variants)
    wgmma = Counter(v["kernel"] for v in variants if v["wgmma"])
    print(f"\nsm_90 launch set (triton {data['triton']}): {data['runs']} runs, {len(variants)} unique variants "
          f"{dict(kinds)}, compiled in {sum(v['seconds'] for v in variants):.0f} s (uncached ones; "
          f"{data['seconds']:.0f} s in all, {data['workers']} compile threads), max shared memory "
          f"{max(v['shared'] for v in variants) / 1024:.0f} KB "
          f"of {data['shared_limit'] // 1024} KB, wgmma in {dict(wgmma)}")
    return data


def _gemm_tile(v):
    """Variants whose tl.dot should run on Hopper's wgmma: half-precision operands of a GEMM-sized tile."""
    c = v["constexprs"]
    half = c.get("DOT_DTYPE") in ("bf16", "fp16")
    if v["kernel"] == "_stats_kernel":
        return half and c.get("FROM_LOGITS") == "False"
    return v["kernel"] == "_mm_kernel" and half


def test_every_launched_variant_compiles_to_a_cubin(launch_set):
    variants = launch_set["variants"]
    assert {v["kernel"] for v in variants} == KERNELS
    assert launch_set["runs"] > 200 and len(variants) > 60
    assert all(v["cubin"] for v in variants)
    slow = [(v["kernel"], v["seconds"]) for v in variants if v["seconds"] > 120]
    assert not slow, f"variants that took minutes to compile: {slow}"


def test_shared_memory_fits_hopper(launch_set):
    over = [(v["kernel"], v["scenario"], v["shared"]) for v in launch_set["variants"]
            if v["shared"] > launch_set["shared_limit"]]
    assert not over


def test_gemm_tiles_use_wgmma(launch_set):
    gemms = [v for v in launch_set["variants"] if _gemm_tile(v)]
    assert len(gemms) >= 10
    missing = [(v["kernel"], v["scenario"]) for v in gemms if not v["wgmma"]]
    assert not missing, f"GEMM tiles that fell back from wgmma: {missing}"


def test_offsets_from_strides_are_64_bit(launch_set):
    """row * stride wraps in int32 once V x H or chunk x V passes 2^31 (a 256000 x 18432 head, or
    chunk_size >= 14135 at V = 151936): every pointer offset derived from a stride argument is i64."""
    bad = {v["kernel"]: v["offsets_not_64_bit"][:2] for v in launch_set["variants"] if v["offsets_not_64_bit"]}
    assert not bad


def test_rows_kernel_has_the_barrier_before_its_gradient_sweep(launch_set):
    rows = [v for v in launch_set["variants"]
            if v["kernel"] == "_rows_kernel" and v["constexprs"]["WANT_GRAD"] == "True"]
    assert rows and all(v["barrier_before_last_loop"] for v in rows)


def test_every_preset_launched_its_rows_kernel(launch_set):
    """The rows kernel variants of the sampled / CE-only tables (which once failed to compile) are in the set."""
    rows = [v["constexprs"] for v in launch_set["variants"] if v["kernel"] == "_rows_kernel"]
    no_source = [c for c in rows if c["HAS_T"] == "False" and c["HAS_P"] == "False"]
    assert any(c["HAS_SAMPLED"] == "True" for c in no_source)  # vanilla_opd_sampled, all-sampled tables
    assert any(c["HAS_CE"] == "True" and c["HAS_SAMPLED"] == "False" for c in no_source)  # opsd + CE


def _softcap(v):
    return v["constexprs"].get("SOFTCAP") == "True"


def test_softcap_variants_are_in_the_set(launch_set):
    """Soft-capped models launch variants of their own (constexpr SOFTCAP) of the four kernels that form logits,
    in every dtype and with and without biases; every check above covers them too."""
    capped = [v for v in launch_set["variants"] if _softcap(v)]
    assert {v["kernel"] for v in capped} == {"_stats_kernel", "_mm_kernel", "_rows_kernel", "_gather_logits_kernel"}
    for kernel in ("_stats_kernel", "_mm_kernel"):
        got = {(v["constexprs"]["DOT_DTYPE"], v["constexprs"]["HAS_BIAS"]) for v in capped if v["kernel"] == kernel}
        assert got == {(d, b) for d in ("bf16", "fp16", "fp32") for b in ("True", "False")}, (kernel, got)
    assert {v["constexprs"]["TOPK"] for v in capped if v["kernel"] == "_stats_kernel"} == {"True", "False"}
    assert all(v["constexprs"]["FROM_LOGITS"] == "False" for v in capped if v["kernel"] == "_stats_kernel")
    rows = [v["constexprs"] for v in capped if v["kernel"] == "_rows_kernel"]
    assert all(c["WANT_GRAD"] == "True" for c in rows) and {c["GRAD_AMAX"] for c in rows} == {"True", "False"}
    gather = {(v["signature"]["h_ptr"], v["constexprs"]["HAS_BIAS"]) for v in capped
              if v["kernel"] == "_gather_logits_kernel"}
    assert gather == {(f"*{d}", b) for d in ("bf16", "fp16", "fp32") for b in ("True", "False")}, gather


def test_identity_variants_carry_no_softcap_code(launch_set):
    """Without a soft-cap the logit epilogue is the multiply it always was: the GEMM's identity variants have no
    exp2 at all; each soft-capped statistics variant has more exp2 (its tanh) than its identity twin."""
    variants = launch_set["variants"]
    mm = [v for v in variants if v["kernel"] == "_mm_kernel"]
    assert all(v["ex2"] == 0 for v in mm if not _softcap(v)) and all(v["ex2"] > 0 for v in mm if _softcap(v))

    def twin_key(v):
        return v["kernel"], tuple(sorted((k, x) for k, x in v["constexprs"].items() if k != "SOFTCAP"))

    plain = {twin_key(v): v["ex2"] for v in variants if v["kernel"] == "_stats_kernel" and not _softcap(v)}
    pairs = [(v["ex2"], plain[twin_key(v)]) for v in variants
             if v["kernel"] == "_stats_kernel" and _softcap(v) and twin_key(v) in plain]
    assert len(pairs) >= 6 and all(capped > ident for capped, ident in pairs), pairs
