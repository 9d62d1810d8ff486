"""DOPD inside TRL: ``DOPDTrainer`` on TRL's ``DistillationTrainer`` (``pip install "dopd[trl]"``).

    from dopd.integrations.trl import DOPDConfig, DOPDTrainer
    args = DOPDConfig(output_dir="out", preset="dopd", self_model="live")
    trainer = DOPDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset)
    trainer.train()

The dataset has ``prompt`` and ``privileged_context`` columns. Importing this module checks that the
installed TRL is a tested release (``TRL_TESTED_RANGE``).
"""

from .version import TRL_TESTED_RANGE, TRLVersionError, check_trl_version

check_trl_version()

from .config import DOPDConfig  # noqa: E402
from .trainer import DOPDTrainer  # noqa: E402

__all__ = ["DOPDConfig", "DOPDTrainer", "TRL_TESTED_RANGE", "TRLVersionError", "check_trl_version"]
