"""Synthetic but routing-realistic inputs: related, different student / self / teacher distributions.

No model is downloaded: everything is built from a seeded generator on the benchmark device, so the
memory child process (``bench.memory``) rebuilds exactly the tensors the timed run used.

Construction (all in float32, cast to the benchmark dtype at the end):
- student hidden ``h ~ N(0, 1)``, student head ``W_s ~ N(0, s^2)`` with ``s = LOGIT_STD / sqrt(Hs)`` so that the
  student logits have a std of a few units, like a trained LM head;
- self (privileged student) hidden ``h + SELF_NOISE * n``: the same model with extra context, close to the student;
- teacher: an orthonormal lift ``P`` (Hs x Ht), hidden ``(h + TEACHER_SHIFT * n1) P + noise``, head
  ``TEACHER_SHARPEN * W_s P + noise``: the teacher agrees with the student on most tokens, is sharper and
  disagrees on some;
- target ids are sampled on-policy from a student that has partly learned the teacher:
  ``(1 - TEACHER_MIX) p_S + TEACHER_MIX p_T``, chunk by chunk. With the constants below the DOPD routes get
  roughly LH 18%, LL 36%, HT 21%, HS 25% (measured with ``routed_loss``; the benchmarks record the actual
  fractions in ``extra_info``). Sampling from the student alone leaves HT near 0: the teacher then rarely
  gives the sampled token more probability than the self pass does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bench.shapes import BenchShape

LOGIT_STD = 3.0
SELF_NOISE = 0.3
TEACHER_SHIFT = 0.3
TEACHER_HIDDEN_NOISE = 0.1
TEACHER_SHARPEN = 1.2
TEACHER_HEAD_NOISE = 0.3
TEACHER_MIX = 0.3
#: Tokens per sequence: the loss sees (B, T) batches, Liger the same tokens flattened.
SEQ_LEN = 512


@dataclass
class BenchInputs:
    """The tensors every implementation receives. ``student_hidden`` and ``student_weight`` are leaves with grad."""

    shape: BenchShape
    student_hidden: torch.Tensor  # (N, Hs), requires grad
    student_weight: torch.Tensor  # (V, Hs), requires grad
    self_hidden: torch.Tensor  # (N, Hs)
    teacher_hidden: torch.Tensor  # (N, Ht)
    teacher_weight: torch.Tensor  # (V, Ht)
    target_ids: torch.Tensor  # (N,) int64, sampled from the student

    @property
    def seq_shape(self) -> tuple[int, int]:
        """(B, T) view of the N tokens used for the routed loss (seq_mean reduction needs sequences)."""
        t = min(SEQ_LEN, self.shape.n)
        if self.shape.n % t:
            return (1, self.shape.n)
        return (self.shape.n // t, t)

    def zero_grads(self) -> None:
        """Drop accumulated gradients so each round computes them from scratch."""
        self.student_hidden.grad = None
        self.student_weight.grad = None


def _randn(gen: torch.Generator, *size: int, device: str) -> torch.Tensor:
    return torch.randn(*size, generator=gen, device=device, dtype=torch.float32)


@torch.no_grad()
def _sample_targets(
    student: tuple[torch.Tensor, torch.Tensor],
    teacher: tuple[torch.Tensor, torch.Tensor],
    gen: torch.Generator,
    chunk: int = 1024,
) -> torch.Tensor:
    """One target id per token from ``(1 - TEACHER_MIX) p_S + TEACHER_MIX p_T``, chunked to bound memory.

    student, teacher: (hidden (N, H), weight (V, H)) pairs.
    """
    (h_s, w_s), (h_t, w_t) = student, teacher
    out = []
    for start in range(0, h_s.shape[0], chunk):
        stop = start + chunk
        probs = torch.softmax(h_s[start:stop] @ w_s.T, dim=-1).mul_(1.0 - TEACHER_MIX)
        probs.add_(torch.softmax(h_t[start:stop] @ w_t.T, dim=-1), alpha=TEACHER_MIX)
        out.append(torch.multinomial(probs, 1, generator=gen).squeeze(1))
    return torch.cat(out)


@torch.no_grad()
def build_inputs(shape: BenchShape, seed: int = 0) -> BenchInputs:
    """Build the benchmark tensors of ``shape`` deterministically from ``seed`` (see the module docstring)."""
    dev = shape.device
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    n, hs_dim, ht_dim, v = shape.n, shape.hs, shape.ht, shape.v
    scale = LOGIT_STD / math.sqrt(hs_dim)

    h = _randn(gen, n, hs_dim, device=dev)
    w_s = _randn(gen, v, hs_dim, device=dev) * scale
    h_self = h + SELF_NOISE * _randn(gen, n, hs_dim, device=dev)

    # Orthonormal lift P (Hs x Ht, P P^T = I): teacher logits ~ TEACHER_SHARPEN * student logits + differences.
    q, _ = torch.linalg.qr(_randn(gen, ht_dim, hs_dim, device=dev))
    lift = q.T.contiguous()
    h_t = (h + TEACHER_SHIFT * _randn(gen, n, hs_dim, device=dev)) @ lift
    h_t += TEACHER_HIDDEN_NOISE * _randn(gen, n, ht_dim, device=dev)
    w_t = TEACHER_SHARPEN * (w_s @ lift)
    w_t += (TEACHER_HEAD_NOISE * scale) * _randn(gen, v, ht_dim, device=dev)

    targets = _sample_targets((h, w_s), (h_t, w_t), gen)
    dt = shape.torch_dtype
    return BenchInputs(
        shape=shape,
        student_hidden=h.to(dt).requires_grad_(True),
        student_weight=w_s.to(dt).requires_grad_(True),
        self_hidden=h_self.to(dt),
        teacher_hidden=h_t.to(dt),
        teacher_weight=w_t.to(dt),
        target_ids=targets,
    )


def save_inputs(inputs: BenchInputs, path: str) -> None:
    """Write the tensors to ``path`` so the memory child process loads them instead of rebuilding (seconds on CPU)."""
    torch.save(
        {
            "shape": inputs.shape.as_dict(),
            "tensors": {
                name: getattr(inputs, name).detach()
                for name in ("student_hidden", "student_weight", "self_hidden", "teacher_hidden", "teacher_weight", "target_ids")
            },
        },
        path,
    )


def load_inputs(path: str) -> BenchInputs:
    """Read tensors written by :func:`save_inputs`; the student hidden states and weight require grad again."""
    blob = torch.load(path, weights_only=True)
    t = blob["tensors"]
    return BenchInputs(
        shape=BenchShape(**blob["shape"]),
        student_hidden=t["student_hidden"].requires_grad_(True),
        student_weight=t["student_weight"].requires_grad_(True),
        self_hidden=t["self_hidden"],
        teacher_hidden=t["teacher_hidden"],
        teacher_weight=t["teacher_weight"],
        target_ids=t["target_ids"],
    )
