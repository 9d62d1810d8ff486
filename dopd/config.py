"""TrainConfig: one dataclass for a training run, loadable from YAML and overridable by flags.

Precedence, lowest first: the dataclass defaults (or the built-in task's defaults, see
``dopd.tasks.registry``), then the YAML file, then command-line flags. Every field is a flag:
``max_steps`` is ``--max-steps``; booleans take ``--name`` / ``--no-name``; ``loss`` (extra
RouteConfig fields) takes ``--loss top_k=64`` and may repeat.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import yaml

PRESETS = ("dopd", "vanilla_opd", "vanilla_opd_sampled", "gkd", "opsd", "sdpo")
SELF_MODELS = ("live", "frozen", "ema")
PARALLEL = ("ddp", "fsdp")


class ConfigError(ValueError):
    """An invalid configuration value; raised before any model is loaded."""


@dataclass
class TrainConfig:
    """Everything a ``dopd train`` run needs. ``student``/``teacher``/``data`` unset means the embedded task."""

    # What to train.
    student: Optional[str] = None  # path or hub id of the student (a causal LM)
    teacher: Optional[str] = None  # path or hub id of the frozen teacher
    tokenizer: Optional[str] = None  # defaults to the student's
    data: Optional[str] = None  # JSON lines with prompt, privileged[, answer]
    eval_data: Optional[str] = None  # held-out records with prompt and answer
    output_dir: str = "dopd-run"
    # The loss.
    preset: str = "dopd"
    loss: dict = field(default_factory=dict)  # RouteConfig overrides, e.g. {"top_k": 64}
    loss_backend: str = "auto"
    # The privileged self pass: "live" = the student's current weights (the paper); "frozen" = the
    # initial student, fixed (SDFT/OPSD-style anchor: a small student can otherwise collapse the self
    # routes by making its hinted and unhinted outputs agree on junk); "ema" = an exponential moving
    # average of the student, updated after every optimizer step (dopd.self_model).
    self_model: str = "live"
    self_ema_decay: float = 0.95  # ema: self <- decay * self + (1 - decay) * student
    # Contexts.
    student_template: str = "{prompt}"
    privileged_template: str = "{prompt}\n\n{privileged}"
    response_prefix: str = "\n"
    use_chat_template: bool = True
    # Rollouts.
    num_generations: int = 4  # G responses per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    # Optimisation.
    prompts_per_step: int = 8  # prompts per micro-batch (each with G responses)
    grad_accum: int = 1
    learning_rate: float = 5e-6
    weight_decay: float = 0.0
    adam_betas: tuple = (0.9, 0.999)
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    max_steps: int = 200
    seed: int = 0
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    use_liger: bool = True  # apply Liger-Kernel patches on CUDA when installed
    # Seeing it.
    progress: bool = True
    report_to: str = "none"  # none | tensorboard | wandb
    log_every: int = 1
    eval_every: int = 0  # 0: evaluate only before and after training (when eval_data is set)
    eval_limit: int = 0  # 0: all eval records
    eval_batch_size: int = 64
    answer_marker: str = "####"
    # Several processes (torchrun; ignored by a plain single-process run).
    parallel: str = "ddp"  # ddp | fsdp (FSDP2: student and teacher sharded per decoder layer)
    local_routing_stats: bool = False  # routing statistics per rank instead of over the global batch
    dist_timeout: float = 1800.0  # seconds a collective may wait for the other ranks before failing
    # Checkpoints.
    save_every: int = 0  # 0: only the final checkpoint
    keep_checkpoints: int = 2
    resume: bool = False
    # The built-in tasks (used when no student, teacher or data is given).
    task: Optional[str] = None  # a name from dopd.tasks.registry (None: the default task)
    cache_dir: Optional[str] = None  # where the pre-trained tiny teacher is cached
    task_size: str = "full"  # full | small | tiny (small: quick looks; tiny: seconds, for tests)

    def validate(self) -> "TrainConfig":
        """Check value ranges; raise :class:`ConfigError` with the field's name."""
        if self.preset not in PRESETS:
            raise ConfigError(f"preset must be one of {PRESETS}, got {self.preset!r}")
        if self.self_model not in SELF_MODELS:
            raise ConfigError(f"self_model must be one of {SELF_MODELS}, got {self.self_model!r}")
        positive = ("num_generations", "max_new_tokens", "prompts_per_step", "grad_accum", "max_steps",
                    "log_every", "eval_batch_size", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "eval_limit", "save_every", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.report_to not in ("none", "tensorboard", "wandb"):
            raise ConfigError(f"report_to must be none, tensorboard or wandb, got {self.report_to!r}")
        if self.parallel not in PARALLEL:
            raise ConfigError(f"parallel must be one of {PARALLEL}, got {self.parallel!r}")
        if not self.dist_timeout > 0:
            raise ConfigError(f"dist_timeout must be > 0 seconds, got {self.dist_timeout}")
        from dopd.tasks.registry import TASK_SIZES, task_names  # names only: no task module is imported

        if self.task_size not in TASK_SIZES:
            raise ConfigError(f"task_size must be one of {TASK_SIZES}, got {self.task_size!r}")
        if self.task is not None and self.task not in task_names():
            raise ConfigError(f"task must be one of {task_names()}, got {self.task!r}")
        if not 0 <= self.self_ema_decay < 1:
            raise ConfigError(f"self_ema_decay must be in [0, 1), got {self.self_ema_decay}")
        if len(tuple(self.adam_betas)) != 2:
            raise ConfigError(f"adam_betas must be two numbers, got {self.adam_betas!r}")
        if not isinstance(self.loss, dict):
            raise ConfigError(f"loss must be a mapping of RouteConfig fields, got {self.loss!r}")
        given = [n for n in ("student", "teacher", "data") if getattr(self, n)]
        if given and len(given) != 3:
            missing = sorted({"student", "teacher", "data"} - set(given))
            raise ConfigError(f"give student, teacher and data together (missing: {missing}); "
                              "give none of them to run the embedded default task")
        return self

    @property
    def is_embedded_default(self) -> bool:
        """True when no student, teacher or data is given: the built-in task runs."""
        return not (self.student or self.teacher or self.data)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (what ``config.yaml`` in the output directory holds)."""
        out = dataclasses.asdict(self)
        out["adam_betas"] = list(self.adam_betas)
        return out


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def apply_overrides(config: TrainConfig, overrides: Mapping[str, Any]) -> TrainConfig:
    """Return a copy of ``config`` with ``overrides`` applied; unknown keys are an error."""
    unknown = sorted(set(overrides) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown config field(s) {unknown}; known: {sorted(_FIELDS)}")
    hints = typing.get_type_hints(TrainConfig)
    values = {k: _coerce(k, v, hints[k]) for k, v in overrides.items()}
    if "loss" in values:  # merge, so that a flag adds to the YAML's loss options
        values["loss"] = {**config.loss, **(values["loss"] or {})}
    if "adam_betas" in values:
        values["adam_betas"] = tuple(values["adam_betas"])
    return dataclasses.replace(config, **values)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """A YAML/flag value as the field's scalar type (PyYAML reads ``5e-6`` as a string), else ConfigError."""
    target = next((t for t in (bool, int, float) if hint is t or t in typing.get_args(hint)), None)
    if target is None or value is None or (isinstance(value, target) and not (target is int and isinstance(value, bool))):
        return value
    if target is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        try:
            if target is bool and text in ("true", "yes", "on", "1", "false", "no", "off", "0"):
                return text in ("true", "yes", "on", "1")
            if target is int:
                return int(text)
            if target is float:
                return float(text)
        except ValueError:
            pass
    raise ConfigError(f"{name} must be a {target.__name__}, got {value!r}")


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML mapping of config fields (hyphens in keys are accepted)."""
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config fields")
    return {str(k).replace("-", "_"): v for k, v in raw.items()}


def _loss_option(text: str) -> tuple[str, Any]:
    """Parse ``key=value`` with a YAML scalar value (so numbers and booleans come out typed)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per TrainConfig field, with one line of help and the field's default (stated once).

    Unset flags stay ``None`` so that they override nothing (hence no argparse defaults: the help text
    carries the real one, from ``dopd.config_help``).
    """
    from dopd.config_help import DEFAULT_TEXT, FIELD_HELP

    hints = typing.get_type_hints(TrainConfig)
    choices = {"preset": PRESETS, "self_model": SELF_MODELS, "parallel": PARALLEL,
               "dtype": ("float32", "bfloat16", "float16"), "report_to": ("none", "tensorboard", "wandb")}
    for name, f in _FIELDS.items():
        flag = "--" + name.replace("_", "-")
        typ = hints[name]
        if typing.get_origin(typ) is typing.Union:  # Optional[X]
            typ = next(a for a in typing.get_args(typ) if a is not type(None))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = DEFAULT_TEXT.get(name) or (" ".join(map(str, default)) if isinstance(default, tuple) else repr(default))
        helptext = f"{FIELD_HELP[name]} (default: {shown})".replace("%", "%%")
        if name == "loss":
            parser.add_argument(flag, type=_loss_option, action="append", metavar="KEY=VALUE", help=helptext)
        elif name == "adam_betas":
            parser.add_argument(flag, type=float, nargs=2, metavar=("B1", "B2"), help=helptext)
        elif typ is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        else:
            parser.add_argument(flag, type=typ, choices=choices.get(name), help=helptext)


def flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields the user actually set on the command line."""
    out = {name: getattr(args, name) for name in _FIELDS if getattr(args, name, None) is not None}
    if "loss" in out:
        out["loss"] = dict(out["loss"])
    return out


def resolve_config(yaml_path: Optional[str], flags: Mapping[str, Any]) -> TrainConfig:
    """Defaults, then YAML, then flags; the embedded task's defaults replace the dataclass defaults
    when neither the YAML nor the flags name a student, teacher or data."""
    layers = [load_yaml(yaml_path) if yaml_path else {}, dict(flags)]
    merged = apply_overrides(apply_overrides(TrainConfig(), layers[0]), layers[1])
    if merged.task is not None and not merged.is_embedded_default:
        raise ConfigError(f"task={merged.task!r} names a built-in task, which brings its own student, teacher and "
                          "data; drop task, or drop student/teacher/data")
    if merged.is_embedded_default:
        from dopd.tasks.registry import task_defaults  # lazy: keeps `dopd --help` fast

        try:
            defaults = task_defaults(merged.task, merged.task_size)
        except (KeyError, ValueError) as err:
            raise ConfigError(str(err).strip("'\"")) from None
        merged = apply_overrides(apply_overrides(apply_overrides(TrainConfig(), defaults), layers[0]), layers[1])
    return merged.validate()
