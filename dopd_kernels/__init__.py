"""dopd_kernels: the DOPD routed distillation loss (reference, PyTorch and Triton paths).

    from dopd_kernels import routed_loss, RouteConfig
    out = routed_loss(student_hidden, lm_head.weight, teacher_hidden, teacher_lm_head.weight,
                      self_hidden, sampled_ids, mask, config=RouteConfig.preset("dopd"))
    out.loss.backward()
"""

from .api import RoutedDistillationLoss, routed_loss, routed_loss_from_logits
from .config import PRESETS, ROUTES, RouteConfig, RouteSpec
from .output import RoutedLossOutput
from .transform import LogitTransform

__all__ = [
    "routed_loss",
    "routed_loss_from_logits",
    "RouteConfig",
    "RouteSpec",
    "RoutedLossOutput",
    "RoutedDistillationLoss",
    "LogitTransform",
    "ROUTES",
    "PRESETS",
]
__version__ = "0.1.0"
