"""Loading the tokenizer, student and teacher, with the compatibility checks done before any weights load.

Checks (each a :class:`CompatibilityError` with both names in the message):
- the teacher's vocabulary (its lm_head rows) must be at least the student's: the loss reads teacher
  rows ``>= V_student`` as padding, so a smaller teacher cannot score every student token;
- the student's and teacher's tokenizers must agree on every token id the student can emit, or the
  teacher would score different strings than the student sampled.
Both read only config.json and tokenizer files, so bad pairs fail in seconds.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch

from dopd.precision import DTYPES  # noqa: F401  (re-exported: the --dtype names)


class CompatibilityError(ValueError):
    """The student and teacher cannot be distilled together (vocabulary or tokenizer mismatch)."""


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU; a device that does not exist here is a ConfigError."""
    from dopd.config import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {name}: not a device; valid: auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"--device {name}: CUDA is not available on this machine; valid here: auto, cpu")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"--device {name}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    elif device.type != "cpu":
        raise ConfigError(f"--device {name}: unsupported device type {device.type!r}; valid: auto, cpu, cuda, cuda:N")
    return device


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (library errors can run to many lines), else its type."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def looks_local(path: str) -> bool:
    """True when ``path`` can only be a local path, not a Hub id (``name`` or ``org/name``).

    That is: it starts with ``/``, ``.`` or ``~``, holds a backslash or more than one ``/``, or its first
    component is an existing local directory (``runs/x`` when ``runs/`` exists).
    """
    if path.startswith(("/", ".", "~")) or "\\" in path or path.count("/") > 1:
        return True
    return "/" in path and os.path.isdir(path.split("/", 1)[0])


def check_model_path(path: str, flag: str) -> None:
    """Fail at once (no Hub round trip) when ``path`` looks local and is not a model directory."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise CompatibilityError(f"{flag} {path}: not a directory (a model is a directory with config.json, "
                                     "or a Hub id)")
        return
    if looks_local(path):
        raise CompatibilityError(f"{flag} {path}: no such directory (a local path; Hub ids look like org/name)")


def model_config(path: str, flag: str) -> Any:
    """The model's ``AutoConfig`` (config.json only, no weights); a CompatibilityError naming ``flag`` when
    it is missing, unreadable or not a causal language model."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    check_model_path(path, flag)
    try:
        cfg = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise CompatibilityError(f"{flag} {path}: cannot read its config ({first_line(err)})") from None
    if type(cfg) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise CompatibilityError(f"{flag} {path}: {type(cfg).__name__} ({cfg.model_type}) is not a causal language "
                                 "model that AutoModelForCausalLM can load")
    return cfg


def load_tokenizer(path: str) -> Any:
    """AutoTokenizer with left padding (prompts are left-padded) and a pad token (EOS when missing)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise CompatibilityError(f"tokenizer {path} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def _vocab_rows(path: str) -> int:
    """The number of lm_head rows from config.json (``vocab_size``; the text config for multimodal configs)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    for c in (cfg.get_text_config(), cfg):
        if c is not None and getattr(c, "vocab_size", None):
            return int(c.vocab_size)
    raise CompatibilityError(f"{path}: config has no vocab_size")


def check_pair(student: str, teacher: str, student_tok: Any, teacher_tok: Optional[Any] = None) -> None:
    """Raise :class:`CompatibilityError` if ``teacher`` cannot score ``student``'s samples.

    ``teacher_tok`` is the teacher's own tokenizer when its directory ships one (else it is assumed to
    use the student's).
    """
    v_s, v_t = _vocab_rows(student), _vocab_rows(teacher)
    if v_t < v_s:
        raise CompatibilityError(
            f"teacher vocabulary ({v_t} rows, {teacher}) is smaller than the student's ({v_s} rows, {student}): "
            "the teacher cannot score every token the student can sample")
    if len(student_tok) > v_s:
        raise CompatibilityError(f"the tokenizer has {len(student_tok)} tokens but the student only {v_s} rows")
    if teacher_tok is not None:
        vs, vt = student_tok.get_vocab(), teacher_tok.get_vocab()
        diff = [t for t, i in vs.items() if vt.get(t) != i]
        if diff:
            shown = ", ".join(repr(t) for t in sorted(diff)[:5])
            raise CompatibilityError(
                f"the student's and teacher's tokenizers disagree on {len(diff)} token(s) (e.g. {shown}); "
                "distillation needs one shared vocabulary")
        if student_tok.chat_template != teacher_tok.chat_template:
            # Not fatal: both contexts are rendered with the student's template (one template for both).
            import warnings

            warnings.warn("the teacher's chat template differs from the student's; the student's is used for both")


def teacher_tokenizer(teacher: str) -> Optional[Any]:
    """The teacher's own tokenizer when its path has tokenizer files, else None."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if os.path.isdir(teacher) and not any(os.path.isfile(os.path.join(teacher, n)) for n in names):
        return None
    try:
        return load_tokenizer(teacher)
    except (OSError, ValueError):
        return None


def load_causal_lm(path: str, dtype: Union[str, torch.dtype], device: torch.device, trainable: bool) -> Any:
    """Load a causal LM in ``dtype``; a frozen one (the teacher) gets ``requires_grad=False`` and eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype] if isinstance(dtype, str) else dtype)
    model = model.to(device)
    # Eval mode for every model, the trained one too (as TRL does): dropout would make the student and
    # self passes compute a different function from the one that sampled the responses.
    model.eval()
    if not trainable:
        model.requires_grad_(False)
    return model


def maybe_apply_liger(model: Any, device: torch.device, enabled: bool) -> bool:
    """On CUDA, patch supported architectures with Liger-Kernel (RMSNorm, SwiGLU, RoPE, ...).

    Only the building blocks are patched, never the fused cross-entropy (this trainer never builds
    logits, so there is no loss to fuse). Liger is imported only here, so CPU runs do not pay for
    Triton. Returns whether a patch was applied.
    """
    if not enabled or device.type != "cuda":
        return False
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return False
    if getattr(model.config, "model_type", None) not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return False  # unsupported architecture: run unpatched
    _apply_liger_kernel_to_instance(model=model, cross_entropy=False, fused_linear_cross_entropy=False)
    return True
