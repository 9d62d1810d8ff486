"""``DOPDConfig``: TRL's ``DistillationConfig`` plus the route settings of the DOPD loss.

TRL's own fields keep their meaning: ``temperature`` divides the logits for sampling and for the loss
(routing included), ``beta`` is the generalized-JSD coefficient (0 forward KL, 1 reverse KL, in between
the JSD with mixture ``beta * source + (1 - beta) * student``) and applies to every route whose
divergence is ``jsd``. ``top_k`` stays TRL's sampling knob: the K of the top-K routes is ``route_top_k``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

from trl import DistillationConfig

from dopd_kernels import PRESETS, ROUTES, RouteConfig, RouteSpec

SELF_MODELS = ("live", "frozen")
LOSS_BACKENDS = ("auto", "torch", "reference", "triton")
#: RouteConfig field -> DOPDConfig field, for error messages that name the argument the user set.
_FIELD_NAMES = {
    "top_k": "route_top_k", "beta_light": "route_beta_light", "beta_weak": "route_beta_weak",
    "trim": "route_trim", "normalize": "route_normalize", "reduction": "route_reduction",
    "chunk_size": "route_chunk_size", "routes": "route_table", "jsd_beta": "beta",
    "temperature": "temperature", "check_values": "route_check_values",
}


@dataclass
class DOPDConfig(DistillationConfig):
    r"""Configuration of :class:`DOPDTrainer`: every field of TRL's ``DistillationConfig``, and:

    preset: the route table: ``"dopd"`` (the paper's), ``"vanilla_opd"``, ``"vanilla_opd_sampled"``,
        ``"gkd"``, ``"opsd"`` or ``"sdpo"`` (``dopd_kernels.RouteConfig.preset``).
    route_table: a custom table instead of the preset, ``{"LH": {"source": "teacher", "divergence": "rkl",
        "support": "topk", "weight": 0.6}, "LL": ..., "HT": ..., "HS": ...}`` (a dict or its JSON string).
    route_top_k, route_beta_light, route_beta_weak, route_trim, route_normalize, route_reduction,
    route_chunk_size, route_check_values: ``RouteConfig``'s ``top_k``, ``beta_light``, ... (the paper's
        defaults: K=128, 0.6, 0.3, 5% trim, min-max normalization, ``seq_mean``).
    privileged_prompt_template: how the self and teacher prompts are built from ``prompt`` and
        ``privileged_context``: for a text prompt the whole prompt, for a conversational one the content of
        the last user turn (inside the chat template, as TRL's SDFT does). An empty privileged context
        leaves the prompt unchanged.
    self_model: ``"live"`` (the trained student, the paper's privileged self) or ``"frozen"`` (the initial
        student, never trained; with a PEFT student, the base model with the adapters disabled).
    loss_backend: ``routed_loss``'s backend: ``"auto"`` (Triton on CUDA, else the chunked PyTorch path),
        ``"torch"``, ``"triton"`` or ``"reference"`` (float64, full logits: tests and small models only).
    beta: as in TRL, but the default is 0.5 (the JS of the paper's HT route) instead of TRL's 1.0.
    """

    _VALID_DICT_FIELDS = DistillationConfig._VALID_DICT_FIELDS + ["route_table"]

    beta: float = field(
        default=0.5,
        metadata={"help": "Generalized-JSD coefficient of every route whose divergence is 'jsd': 0.0 forward KL, "
                          "1.0 reverse KL, 0.5 JS (the paper's HT route; TRL's DistillationConfig defaults to 1.0)."},
    )
    preset: str = field(
        default="dopd",
        metadata={"help": f"Route table: one of {', '.join(PRESETS)}.", "choices": list(PRESETS)},
    )
    route_table: Optional[dict[str, Any] | str] = field(
        default=None,
        metadata={"help": "A custom route table (JSON) replacing the preset: for each of LH, LL, HT, HS a dict "
                          "with source (teacher|self), divergence (rkl|fkl|jsd), support (full|topk|sampled), weight."},
    )
    route_top_k: int = field(default=128, metadata={"help": "K of the top-K routes (not TRL's sampling top_k)."})
    route_beta_light: float = field(default=0.6, metadata={"help": "Weight of the LH and HS routes (beta_light)."})
    route_beta_weak: float = field(default=0.3, metadata={"help": "Weight of the LL route (beta_weak)."})
    route_trim: float = field(default=0.05, metadata={"help": "Share of the largest values trimmed from the "
                                                                     "routing statistics."})
    route_normalize: str = field(default="minmax", metadata={"help": "Routing statistics: minmax | zscore | none."})
    route_reduction: str = field(default="seq_mean", metadata={"help": "seq_mean (the paper's) | token_mean | sum, "
                                                                        "over the whole optimizer batch."})
    route_chunk_size: int = field(default=256, metadata={"help": "Tokens per chunk of the loss (the memory knob)."})
    route_check_values: bool = field(default=True, metadata={"help": "Check hidden states are finite and ids in "
                                                                       "range (one host sync per step)."})
    privileged_prompt_template: str = field(
        default="{prompt}\n\n{privileged_context}",
        metadata={"help": "Template of the self and teacher prompts; uses {prompt} and {privileged_context}."},
    )
    self_model: str = field(default="live", metadata={"help": "Privileged self: live | frozen.",
                                                      "choices": list(SELF_MODELS)})
    loss_backend: str = field(default="auto", metadata={"help": "routed_loss backend: auto | torch | triton | "
                                                                 "reference.", "choices": list(LOSS_BACKENDS)})

    def __post_init__(self) -> None:
        if isinstance(self.route_table, str):  # the CLI passes JSON; parsed here to name the field on an error
            try:
                self.route_table = json.loads(self.route_table)
            except json.JSONDecodeError as err:
                raise ValueError(f"route_table: not valid JSON: {err}") from None
        super().__post_init__()
        if self.self_model not in SELF_MODELS:
            raise ValueError(f"self_model must be one of {SELF_MODELS}, got {self.self_model!r}")
        if self.loss_backend not in LOSS_BACKENDS:
            raise ValueError(f"loss_backend must be one of {LOSS_BACKENDS}, got {self.loss_backend!r}")
        _check_template(self.privileged_prompt_template)
        self.route_config()  # validates every route_* field now, not at the first step

    def route_config(self, stats_group: Any = None) -> RouteConfig:
        """The ``RouteConfig`` these fields describe (routing statistics over ``stats_group``'s ranks)."""
        try:
            routes = (_table(self.route_table) if self.route_table is not None
                      else RouteConfig.preset(self.preset).routes)
            return RouteConfig(
                routes=tuple(_with_beta(spec, self.beta) for spec in routes),
                top_k=self.route_top_k, beta_light=self.route_beta_light, beta_weak=self.route_beta_weak,
                trim=self.route_trim, normalize=self.route_normalize, reduction=self.route_reduction,
                chunk_size=self.route_chunk_size, check_values=self.route_check_values,
                temperature=self.temperature, jsd_beta=self.beta if 0.0 < self.beta < 1.0 else 0.5,
                stats_group=stats_group,
            )
        except ValueError as err:
            raise ValueError(_rename(str(err))) from None


def _check_template(template: str) -> None:
    if not isinstance(template, str) or "{prompt}" not in template:
        raise ValueError(f"privileged_prompt_template must be a string containing {{prompt}}, got {template!r}")
    try:
        template.format(prompt="", privileged_context="")
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"privileged_prompt_template may only use {{prompt}} and {{privileged_context}}: "
                         f"{err!r}") from None


def _table(table: Any) -> tuple[RouteSpec, ...]:
    if not isinstance(table, dict):
        raise ValueError(f"routes: expected a dict keyed by {ROUTES}, got {type(table).__name__}")
    return RouteConfig(routes=table).routes


def _with_beta(spec: RouteSpec, beta: float) -> RouteSpec:
    """TRL's ``beta`` at its ends is not a JSD but a KL: 0 -> forward KL, 1 -> reverse KL (as in TRL's loss)."""
    if spec.divergence != "jsd" or 0.0 < beta < 1.0:
        return spec
    return RouteSpec(spec.source, "fkl" if beta == 0.0 else "rkl", spec.support, spec.weight)


def _rename(message: str) -> str:
    """Say ``route_top_k must be ...`` rather than ``top_k must be ...``: name the field the user set."""
    head, sep, rest = message.partition(" ")
    name = head.rstrip(":")
    if name in _FIELD_NAMES:
        return _FIELD_NAMES[name] + head[len(name):] + sep + rest
    return message
