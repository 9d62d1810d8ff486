"""Everything ``dopd train`` and ``dopd eval`` can check before a single weight loads.

Two stages, both before anything is written to the output directory:
1. :func:`check_flags` -- the flags alone, in milliseconds: the loss options (``--loss``,
   ``--loss-backend``), the device, the temperatures. The CLI runs it before the embedded task trains
   its teacher, so a typo never waits for minutes of set-up.
2. :func:`check_run` -- the files, in seconds: data (and answers in the eval data), the model configs
   (``AutoConfig``: a local-looking path that does not exist fails at once, without asking the Hub),
   each model's logit post-processing (applied exactly, or the model is refused), the tokenizers and
   vocabularies.
Every failure is a :class:`~dopd.config.ConfigError`, :class:`~dopd.data.DataError` or
:class:`~dopd.modeling.CompatibilityError` naming the flag, the value and the valid values; the CLI
prints it as ``dopd <command>: error: ...`` and exits with status 2.

The temperature rule: ``--temperature`` is the sampling temperature, and the loss and routing use the
same one unless ``--loss temperature=...`` says otherwise (then a warning says that they differ): the
log-probs that route and supervise a token are those of the policy that sampled it.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch

from dopd.config import ConfigError, TrainConfig
from dopd.data import DataError, Record, load_records
from dopd.modeling import (CompatibilityError, check_model_path, check_pair, first_line, load_tokenizer, model_config,
                           resolve_device, teacher_tokenizer)
from dopd.precision import Precision


def route_config(config: TrainConfig) -> Any:
    """The loss's RouteConfig: the preset, then ``config.loss`` (``routes``: a table replacing the
    preset's); the loss temperature defaults to the sampling temperature (module docstring). Bad
    ``--loss`` options are a ConfigError naming them."""
    from dopd_kernels import RouteConfig

    options = {"temperature": config.temperature, **config.loss}
    routes = options.pop("routes", None)  # a custom route table replaces the preset's (e.g. an ablation)
    valid = sorted(f.name for f in dataclasses.fields(RouteConfig) if f.name not in ("routes", "stats_group"))
    unknown = sorted(set(options) - set(valid))
    if unknown:
        key = unknown[0]
        raise ConfigError(f"--loss {key}={options[key]}: unknown loss option {key!r}; valid keys: {', '.join(valid)}")
    try:
        route = RouteConfig.preset(config.preset, **options)
        route = route if routes is None else route.replace(routes=routes)
    except (TypeError, ValueError) as err:
        given = ", ".join(f"{k}={v!r}" for k, v in config.loss.items()) or f"temperature={config.temperature!r}"
        raise ConfigError(f"--loss {given}: {err}") from None
    if route.ce_weight > 0:
        raise ConfigError(f"--loss ce_weight={route.ce_weight}: the CE term needs hard labels, and the trainer has "
                          "only on-policy samples; valid here: ce_weight=0")
    return route


@dataclass
class FlagChecks:
    """What the flags resolve to: the device, the precision policy and the loss's RouteConfig."""

    device: torch.device
    precision: Precision
    loss_config: Any


def check_backend(backend: str, device: torch.device) -> None:
    """``--loss-backend``: a known name that can run on ``device``."""
    from dopd_kernels.api import BACKENDS

    if backend not in BACKENDS:
        raise ConfigError(f"--loss-backend {backend}: unknown backend; valid: {', '.join(BACKENDS)}")
    if backend == "triton":
        try:
            import dopd_kernels.triton  # noqa: F401
        except ImportError as err:
            raise ConfigError(f"--loss-backend triton: the Triton kernels are not importable ({err}); install the "
                              "'kernels' extra, or use --loss-backend auto|torch") from None
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError(f"--loss-backend triton needs a CUDA device, and --device resolves to {device}; "
                              "valid here: auto, torch, reference")


def check_flags(config: TrainConfig, warn: bool = True) -> FlagChecks:
    """Stage 1 (module docstring): the flags alone. Warns when the loss temperature differs from the sampling one."""
    config.validate()
    device = resolve_device(config.device)
    check_backend(config.loss_backend, device)
    loss_config = route_config(config)
    if warn and loss_config.temperature != config.temperature:
        warnings.warn(f"the loss and routing use temperature {loss_config.temperature} (--loss temperature=...) but "
                      f"responses are sampled at --temperature {config.temperature}: the log-probs that route and "
                      "supervise each token are not those of the policy that sampled it", stacklevel=2)
    return FlagChecks(device, Precision(config.dtype), loss_config)


def logit_transforms(student: str, teacher: str) -> dict[str, Any]:
    """The student's and teacher's logit post-processing from their configs (no weights), as routed_loss
    keywords; a model whose post-processing the loss cannot reproduce is a CompatibilityError."""
    from dopd.passes import logit_transform

    out = {}
    for flag, path, key in (("--student", student, "student_transform"), ("--teacher", teacher, "teacher_transform")):
        try:
            out[key] = logit_transform(model_config(path, flag), name=f"{flag} {path}")
        except CompatibilityError:
            raise
        except ValueError as err:
            raise CompatibilityError(str(err)) from None
    return out


@dataclass
class RunPlan(FlagChecks):
    """Everything :func:`check_run` read and checked; what the trainer then loads the models with."""

    records: list[Record] = dataclasses.field(default_factory=list)
    eval_records: list[Record] = dataclasses.field(default_factory=list)
    tokenizer: Any = None
    transforms: dict[str, Any] = dataclasses.field(default_factory=dict)  # routed_loss's *_transform keywords


def load_data(flag: str, path: Any, eval_data: bool = False) -> list[Record]:
    """Records of ``--data`` / ``--eval-data`` (every eval record needs an answer); errors name the flag."""
    try:
        return load_records(path, require_privileged=not eval_data, require_answer=eval_data)
    except DataError as err:
        raise DataError(f"{flag}: {err}") from None


def check_run(config: TrainConfig, flags: Optional[FlagChecks] = None) -> RunPlan:
    """Stage 2 (module docstring): data, model configs, logit transforms, tokenizers. No weights load."""
    flags = flags or check_flags(config)
    records = load_data("--data", config.data)
    eval_records = load_data("--eval-data", config.eval_data, eval_data=True) if config.eval_data else []
    transforms = logit_transforms(config.student, config.teacher)  # reads both configs (local paths first)
    tokenizer_path, tokenizer_flag = (config.tokenizer, "--tokenizer") if config.tokenizer else (config.student, "--student")
    if config.tokenizer:
        check_model_path(config.tokenizer, "--tokenizer")
    try:
        tokenizer = load_tokenizer(tokenizer_path)
    except (OSError, ValueError) as err:
        if isinstance(err, CompatibilityError):
            raise
        raise CompatibilityError(f"{tokenizer_flag} {tokenizer_path}: cannot load its tokenizer "
                                 f"({first_line(err)})") from None
    check_pair(config.student, config.teacher, tokenizer, teacher_tokenizer(config.teacher))
    return RunPlan(flags.device, flags.precision, flags.loss_config, records, eval_records, tokenizer, transforms)
