"""``backend="auto"`` on CUDA: a one-time check that the Triton kernels agree with the PyTorch path.

The kernels are tested under Triton's interpreter and compiled for sm_90 in the test suite, but had not
run on a GPU when this was written. So the first ``backend="auto"`` call on each CUDA device of a process
runs a small problem through both paths and compares loss, per-token values, routes and gradients. On a
mismatch, or if the kernels fail to compile or launch, it warns once (naming the device and the torch /
Triton versions) and ``backend="auto"`` uses the PyTorch path on that device for the rest of the process.
``DOPD_TRITON_SELFCHECK=0`` skips the check (``backend="triton"`` never runs it).
The problem mirrors the call (its config, dtype, biases, which tensors want gradients, the three models'
logit transforms: a soft-cap compiles kernel variants of its own) at 2 x 64 tokens, V = 33792,
H = 64 / 96, sizes that give the kernels the specializations of real shapes (multiples of 16, several
vocabulary splits, full-size top-K lists), so the variants it compiles are the ones the call compiles
anyway (checked with the sm_90 launch recorder of tests/_triton_launches.py for dopd and
vanilla_opd_sampled against N = 16384, V = 151936): it adds a small problem's run time, no compile time.
Inside a CUDA graph capture it cannot run (it compares on the host): it is skipped there, which is one
more reason for the warm-up call before a capture.
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple, Optional

import torch

from .config import RouteConfig
from .transform import IDENTITY, LogitTransform

ENV_VAR = "DOPD_TRITON_SELFCHECK"
#: (device type, index) -> the kernels agreed (True) or not (False).
_results: dict[tuple[str, Optional[int]], bool] = {}
#: Default problem: (sequences, tokens per sequence, student hidden, teacher hidden, vocabulary, padding rows).
SHAPE = (2, 64, 64, 96, 33792, 64)


class CallShape(NamedTuple):
    """What of a call decides which kernel variants launch, besides the config and the dtype."""

    student_bias: bool = True
    teacher_bias: bool = False
    grad_hidden: bool = True
    grad_weight: bool = True
    grad_bias: bool = True
    #: (student, teacher, self) logit transforms of the call.
    transforms: tuple[LogitTransform, LogitTransform, LogitTransform] = (IDENTITY, IDENTITY, IDENTITY)

    @classmethod
    def of(cls, student_hidden, student_weight, student_bias, teacher_bias,
           transforms: tuple[LogitTransform, LogitTransform, LogitTransform] = (IDENTITY, IDENTITY, IDENTITY),
           ) -> "CallShape":
        """The call's biases, the tensors that want gradients (none under torch.no_grad) and its transforms."""
        grad = torch.is_grad_enabled()
        return cls(student_bias is not None, teacher_bias is not None, grad and student_hidden.requires_grad,
                   grad and student_weight.requires_grad,
                   grad and student_bias is not None and student_bias.requires_grad, tuple(transforms))


def triton_agrees(device: torch.device, config: RouteConfig, dtype: torch.dtype,
                  call: CallShape = CallShape()) -> bool:
    """Whether ``backend="auto"`` may use Triton on ``device`` (checked once per process and device)."""
    if os.environ.get(ENV_VAR, "1").strip() == "0" or dtype == torch.float64:
        return True  # float64 runs on the PyTorch path inside the Triton backend anyway
    key = (device.type, device.index)
    if key in _results:
        return _results[key]
    if _capturing(device):
        return True  # cannot compare on the host during a capture (see the module docstring)
    problem = check(device, config, dtype, call=call)
    _results[key] = problem is None
    if problem is not None:
        import triton

        warnings.warn(
            f"dopd_kernels: the Triton kernels disagree with the PyTorch path on {device} ({_name(device)}, torch "
            f"{torch.__version__}, triton {triton.__version__}): {problem}. backend='auto' uses the PyTorch path "
            f"on this device for the rest of the process; please report this. {ENV_VAR}=0 skips the check.",
            RuntimeWarning, stacklevel=3)
    return _results[key]


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _name(device: torch.device) -> str:
    try:
        return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    except Exception:  # the warning must not fail
        return "unknown device"


def check(device: torch.device, config: RouteConfig, dtype: torch.dtype, shape: tuple = SHAPE,
          call: CallShape = CallShape()) -> Optional[str]:
    """Run a small problem through both paths; None if they agree, else what differs."""
    from .chunked import chunked_routed_loss
    from .triton import triton_routed_loss

    config = config.replace(stats_group=None, chunk_size=64)
    try:
        with torch.enable_grad():
            inputs = _problem(device, dtype, config, shape, call)
            ref = _run(chunked_routed_loss, inputs, config, call)
            got = _run(triton_routed_loss, inputs, config, call)
    except Exception as exc:  # a compile or launch failure is a reason to fall back too
        return f"the Triton path raised {type(exc).__name__}: {exc}"
    return _compare(got, ref, tol=1e-3 if dtype == torch.float32 else 3e-2)


def _problem(device, dtype, config, shape, call):
    b, t, hs, ht, vocab, pad = shape
    g = torch.Generator(device="cpu").manual_seed(1234)  # the caller's RNG stays untouched

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=g) * scale).to(device=device, dtype=dtype)

    h = randn(b, t, hs)
    mask = torch.rand(b, t, generator=g) > 0.1
    target = torch.randint(0, vocab, (b, t), generator=g)
    return dict(
        student_hidden=h, student_weight=randn(vocab, hs, scale=2 / hs**0.5),
        teacher_hidden=randn(b, t, ht), teacher_weight=randn(vocab + pad, ht, scale=3 / ht**0.5),
        self_hidden=(h.float() + 0.5 * randn(b, t, hs).float()).to(dtype), target_ids=target.to(device),
        valid=mask.to(device), student_bias=randn(vocab, scale=0.1) if call.student_bias else None,
        teacher_bias=randn(vocab + pad, scale=0.1) if call.teacher_bias else None,
        hard_labels=torch.where(mask, target, 0).to(device) if config.ce_weight > 0 else None,
    )


def _run(fn, inputs, config, call):
    wants = (call.grad_hidden, call.grad_weight, call.grad_bias)
    leaves = [None if inputs[k] is None else inputs[k].detach().clone().requires_grad_(want)
              for k, want in zip(("student_hidden", "student_weight", "student_bias"), wants)]
    tf_s, tf_t, tf_p = call.transforms
    out = fn(leaves[0], leaves[1], inputs["teacher_hidden"], inputs["teacher_weight"], inputs["self_hidden"],
             inputs["target_ids"], inputs["valid"].reshape(inputs["target_ids"].shape), student_bias=leaves[2],
             teacher_bias=inputs["teacher_bias"], hard_labels=inputs["hard_labels"], config=config,
             student_transform=tf_s, teacher_transform=tf_t, self_transform=tf_p)
    if any(wants):
        out.loss.backward()
    return dict(loss=out.loss.detach(), per_token=out.per_token_loss.detach().float(), route=out.route,
                logprob=out.student_logprob.detach().float(),
                grads=[x.grad.float() for x in leaves if x is not None and x.grad is not None])


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item() if ref.numel() else 0.0


def _compare(got: dict, ref: dict, tol: float) -> Optional[str]:
    same_route = got["route"] == ref["route"]
    if same_route.float().mean().item() < 0.98:  # a near-tie may flip a token or two in half precision
        return f"routes differ on {(~same_route).sum().item()} of {same_route.numel()} tokens"
    for name in ("per_token", "logprob"):
        err = _rel(got[name][same_route], ref[name][same_route])
        if not err <= tol:  # catches NaN too
            return f"{name} differs by {err:.3g} (relative, tolerance {tol})"
    if bool(same_route.all()):
        if not _rel(got["loss"], ref["loss"]) <= tol:
            return f"loss {got['loss'].item():.6g} vs {ref['loss'].item():.6g}"
        for name, g, r in zip(("d hidden", "d weight", "d bias"), got["grads"], ref["grads"]):
            err = _rel(g, r)
            if not err <= tol:
                return f"{name} differs by {err:.3g} (relative, tolerance {tol})"
    return None
