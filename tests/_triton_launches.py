"""The Triton path's real launch set, compiled for Hopper (sm_90) without a GPU.

Run as a script (``python tests/_triton_launches.py OUT.json [WORKERS]``) with ``TRITON_INTERPRET`` unset:
it runs ``routed_loss(backend="triton")`` on CPU tensors over the scenarios below (every preset, CE on and
off, custom route tables, bf16 / fp16 / fp32, biases, the two-pass statistics mode, with and without
gradients, a ragged shape, a long batch, an odd chunk size; and soft-capped models, whose kernels are
variants of their own) with the GPU tile sizes (``blocks.GPU_BLOCKS`` stands in for the interpreter
tiles). Each kernel launch is not executed but handed to Triton's own launcher in warm-up mode against a
stand-in driver whose target is sm_90: Triton binds the arguments
exactly as for a real launch (16-divisibility of pointers and ints, strides equal to 1 as constants),
compiles each specialization once (its in-memory and on-disk caches dedupe the rest) and returns it;
with WORKERS > 1 (default 2) the compiles run in that many threads (Triton's AsyncCompileMode) while the
scenarios go on recording, the same variants as serially.
The launches' outputs stay uninitialized, which changes nothing: which kernels launch never depends on
data (the path has no host sync). Writes one JSON record per unique compiled variant: kernel, constexprs,
signature, shared memory, whether the PTX uses wgmma, its count of ex2 (MUFU exp2) instructions, the
64-bit offset check, the compile time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

#: Hopper's largest dynamic shared memory per block (227 KB).
SM90_SHARED_LIMIT = 227 * 1024
STRIDE_ARG = re.compile(r"^(s_[a-z]{2}|stride_\w+)$")


class Sm90Driver:
    """The three questions Triton's launcher asks a driver before compiling (target, device, stream)."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def offsets_are_64_bit(ttir: str, arg_names: list[str]) -> list[str]:
    """TTIR lines where a pointer offset computed from a stride argument is not 64-bit (empty: all are).

    A value is stride-derived if a stride argument (``s_am``, ``stride_z``, ...) flows into it; every
    ``tt.addptr`` whose offset operand is stride-derived must take i64 offsets, else ``row * stride``
    wraps past 2^31.
    """
    derived = {f"%{n}" for n in arg_names if STRIDE_ARG.match(n)}
    bad = []
    for line in ttir.splitlines():
        m = re.match(r"\s*(%[\w.#]+)(?::\d+)? = ([\w.]+) (.*)", line)
        if not m:
            continue
        result, op, rest = m.groups()
        operands = re.findall(r"%[\w.#]+", rest.split(" loc(")[0])
        if op == "tt.addptr" and len(operands) >= 2 and operands[1] in derived:
            offset_type = rest.split(":")[-1].split(" loc(")[0]
            if not re.search(r"\bi64\b|xi64>", offset_type):
                bad.append(line.strip())
        if any(o in derived for o in operands):
            derived.add(result)
    return bad


def barrier_before_last_loop(ttir: str) -> bool:
    """Whether the TTIR has a barrier (tl.debug_barrier: ``gpu.barrier``, ``ttg.barrier`` in Triton 3.9) before
    its last ``scf.for``: in the rows kernel, between the scalar reads of z_s[y] / z_s[yh] and the sweep that
    overwrites z_s in place."""
    lines = ttir.splitlines()
    barriers = [i for i, line in enumerate(lines) if re.search(r"\b(gpu|ttg)\.barrier\b", line)]
    loops = [i for i, line in enumerate(lines) if "scf.for" in line]
    return bool(barriers and loops and barriers[-1] < loops[-1])


def _inputs(dtype, n_tokens, hs, ht, vocab, pad, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    lead = (2, n_tokens // 2)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    t = dict(student_hidden=r(*lead, hs), student_weight=r(vocab, hs), teacher_hidden=r(*lead, ht),
             teacher_weight=r(vocab + pad, ht), self_hidden=r(*lead, hs))
    if bias:
        t["student_bias"], t["teacher_bias"] = r(vocab), r(vocab + pad)
    target = torch.randint(0, vocab, lead, generator=g)
    mask = torch.rand(*lead, generator=g) > 0.1
    return t, target, mask


CUSTOM_TABLES = {
    "mix": (("teacher", "fkl", "topk", 0.7), ("self", "jsd", "full", 0.4), ("teacher", "rkl", "full", 1.0),
            ("teacher", "rkl", "sampled", 0.5)),
    "self_sampled": (("self", "rkl", "sampled", 1.0),) * 4,
    "full_both": (("self", "rkl", "full", 1.0), ("teacher", "fkl", "full", 1.0), ("teacher", "jsd", "full", 1.0),
                  ("self", "fkl", "full", 0.5)),
}


def scenarios():
    """(name, config, dtype, grad, bias, impl, shape, transforms) for the sweep."""
    for scenario in _identity_scenarios():
        yield scenario + ({},)
    yield from _softcap_scenarios()


def _identity_scenarios():
    from dopd_kernels import PRESETS, RouteConfig

    tables = {p: (lambda p=p, **kw: RouteConfig.preset(p, **kw)) for p in PRESETS}
    tables |= {k: (lambda v=v, **kw: RouteConfig(routes=v, **kw)) for k, v in CUSTOM_TABLES.items()}
    aligned = ALIGNED
    for name, make in tables.items():
        for ce in (0.0, 0.1):
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                for bias in (False, True):
                    for grad in ("all", "none"):
                        yield f"{name} ce={ce}", make(ce_weight=ce), dtype, grad, bias, "fused", aligned
    for name in ("dopd", "vanilla_opd"):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for bias in (False, True):
                yield f"{name} two-pass", tables[name](), dtype, "all", bias, "two_pass", aligned
    for name in ("dopd", "gkd"):  # a frozen head (LoRA): d hidden only
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            yield f"{name} hidden-only", tables[name](), dtype, "hidden", True, "fused", aligned
    ragged = dict(n_tokens=90, hs=72, ht=88, vocab=1001, pad=61, chunk=256)  # V, H not multiples of 16
    for name in ("dopd", "vanilla_opd", "vanilla_opd_sampled", "gkd"):
        for dtype in (torch.bfloat16, torch.float16):
            yield f"{name} ragged", tables[name](), dtype, "all", True, "fused", ragged
    long = dict(aligned, n_tokens=34000)  # enough token blocks for a single vocabulary split
    for name in ("dopd", "vanilla_opd"):
        yield f"{name} long", tables[name](), torch.bfloat16, "all", False, "fused", long
    several = dict(aligned, n_tokens=300, chunk=100)  # several chunks (fp16: one scale slot each)
    for dtype in (torch.bfloat16, torch.float16):
        yield "vanilla_opd chunks=3", tables["vanilla_opd"](), dtype, "all", True, "fused", several


ALIGNED = dict(n_tokens=96, hs=64, ht=96, vocab=1024, pad=64, chunk=256)


def _softcap_scenarios():
    """The soft-capped variants (constexpr SOFTCAP; a multiplier alone changes no variant): in every dtype, with
    and without biases, the tables that reach every kernel and rows-kernel branch a soft-cap touches: dopd with
    CE (statistics with top-K, top-K gather, rows kernel with a teacher source), vanilla_opd_sampled (no
    source buffer, statistics without top-K), the mixed table (teacher and self sources, every divergence);
    and the two-pass statistics mode (the cap in the logit GEMM's epilogue). Gradients on: the rows kernel
    without them has no soft-cap code and compiles its identity variant. Gemma-2's cap, Cohere-like scales."""
    from dopd_kernels import LogitTransform, RouteConfig

    gemma = dict(student_transform=LogitTransform(softcap=30.0),
                 teacher_transform=LogitTransform(scale=0.5, softcap=30.0))
    tables = {"dopd ce=0.1": RouteConfig.preset("dopd", ce_weight=0.1),
              "vanilla_opd_sampled": RouteConfig.preset("vanilla_opd_sampled"),
              "mix": RouteConfig(routes=CUSTOM_TABLES["mix"])}
    for name, config in tables.items():
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for bias in (False, True):
                if name == "mix" and not bias:
                    continue  # its bias-free statistics / GEMM variants are the other two tables'
                yield f"{name} softcap", config, dtype, "all", bias, "fused", ALIGNED, gemma
    yield "dopd softcap two-pass", RouteConfig.preset("dopd"), torch.bfloat16, "all", True, "two_pass", ALIGNED, gemma


class _TimedExecutor(ThreadPoolExecutor):
    """Compile threads that time each compile and name the kernel and scenario of a failure."""

    def __init__(self, workers: int, where: list):
        super().__init__(max_workers=workers)
        self.where = where  # [scenario, kernel] of the launch being recorded (submit runs inside it)
        self.seconds: dict[int, float] = {}
        self.errors: list[str] = []

    def submit(self, fn, /, *args, **kwargs):
        scenario, kernel = self.where

        def timed():
            t0 = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
            except Exception as exc:
                self.errors.append(f"{kernel} failed to compile for sm_90 in scenario {scenario!r}: {exc}")
                raise
            self.seconds[id(out)] = round(time.perf_counter() - t0, 2)
            return out

        return super().submit(timed)


def _record(name: str, scenario: str, kwargs: dict, arg_names: list, kernel, seconds: float) -> dict:
    ptx = kernel.asm["ptx"]
    return dict(
        kernel=name, scenario=scenario,
        constexprs={k: str(v) for k, v in kwargs.items() if k in arg_names},
        signature={k: v for k, v in kernel.src.signature.items() if v != "constexpr"} if hasattr(kernel, "src") else {},
        shared=int(kernel.metadata.shared), wgmma="wgmma.mma_async" in ptx, cubin="cubin" in kernel.asm,
        ex2=ptx.count("ex2.approx"),  # MUFU exp2: the log-sum-exp's, and the soft-cap's tanh
        offsets_not_64_bit=offsets_are_64_bit(kernel.asm["ttir"], arg_names),
        barrier_before_last_loop=barrier_before_last_loop(kernel.asm["ttir"]),
        seconds=seconds,
    )


def main(out_path: str, workers: int = 2) -> None:
    """Record and compile the launch set. ``workers`` > 1: compiles run in that many threads through Triton's
    AsyncCompileMode (its MLIR passes, LLVM and ptxas release the GIL) while the scenarios keep launching;
    the variants and the checks are the same as with 1 (serial)."""
    import dopd_kernels.triton  # noqa: F401  (registers the kernels)
    from dopd_kernels import routed_loss
    from dopd_kernels.triton import blocks

    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:  # a Triton without it: compile serially
        workers = 1
    driver.set_active(Sm90Driver())
    pending: dict[int, tuple] = {}  # id(kernel or future) -> (kernel or future, name, scenario, kwargs, arg names)
    serial_seconds: dict[int, float] = {}
    where = ["", ""]
    executor = _TimedExecutor(workers, where) if workers > 1 else None

    def getitem(self, grid):
        def launch(*args, **kwargs):
            where[1] = self.fn.__name__
            t0 = time.perf_counter()
            try:
                kernel = self.run(*args, grid=grid, warmup=True, **kwargs)
            except Exception as exc:
                raise RuntimeError(f"{self.fn.__name__} failed to compile for sm_90 in scenario "
                                   f"{where[0]!r}: {exc}") from exc
            if id(kernel) not in pending:
                pending[id(kernel)] = (kernel, self.fn.__name__, where[0], kwargs, self.arg_names)
                serial_seconds[id(kernel)] = round(time.perf_counter() - t0, 2)
            return kernel
        return launch

    JITFunction.__getitem__ = getitem
    start = time.perf_counter()
    runs = 0
    with contextlib.ExitStack() as stack:
        if executor is not None:
            stack.enter_context(executor)
            stack.enter_context(AsyncCompileMode(executor, ignore_errors=True))
        for name, config, dtype, grad, bias, impl, shape, transforms in scenarios():
            where[0] = (f"{name} {str(dtype).split('.')[-1]} grad={grad} bias={bias} {impl} V={shape['vocab']}"
                        + (" softcap" if transforms else ""))
            gpu = dataclasses.replace(blocks.GPU_BLOCKS, stats_impl=impl)
            blocks.INTERPRETER_BLOCKS = gpu  # CPU tensors, GPU tiles and GPU decisions (blocks.gpu)
            t, target, mask = _inputs(dtype, shape["n_tokens"], shape["hs"], shape["ht"], shape["vocab"],
                                      shape["pad"], bias)
            if grad != "none":
                t["student_hidden"].requires_grad_()
                t["student_weight"].requires_grad_(grad == "all")
                if bias:
                    t["student_bias"].requires_grad_(grad == "all")
            labels = torch.where(mask, target, 0) if config.ce_weight > 0 else None
            config = config.replace(chunk_size=shape["chunk"])
            with torch.set_grad_enabled(grad != "none"):
                out = routed_loss(t.pop("student_hidden"), t.pop("student_weight"), t.pop("teacher_hidden"),
                                  t.pop("teacher_weight"), t.pop("self_hidden"), target, mask, hard_labels=labels,
                                  config=config, backend="triton", **t, **transforms)
                out.student_logprob  # the lazy student statistics pass (metrics)
            runs += 1
    if executor is not None and executor.errors:
        raise RuntimeError("; ".join(executor.errors))
    variants = []
    for key, (kernel, name, scenario, kwargs, arg_names) in pending.items():
        if executor is not None:
            kernel = kernel.result() if hasattr(kernel, "future") else kernel
            seconds = executor.seconds.get(id(kernel), 0.0)
        else:
            seconds = serial_seconds[key]
        variants.append(_record(name, scenario, kwargs, arg_names, kernel, seconds))
    summary = dict(runs=runs, seconds=round(time.perf_counter() - start, 1), variants=variants,
                   triton=triton.__version__, shared_limit=SM90_SHARED_LIMIT, workers=workers)
    with open(out_path, "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2)
