"""The TRL releases this integration is tested against, and the check that refuses the others.

The integration overrides private methods of TRL's ``DistillationTrainer`` (``_compute_loss``,
``_generate_and_score_completions``, ``_get_last_hidden_state``), which change between TRL releases
without notice. A release outside the tested range is refused before any training starts, with the
range in the message; ``DOPD_ALLOW_UNTESTED_TRL=1`` downgrades the refusal to a warning for those who
want to try (at their own risk: a silently changed private method can give a wrong loss).
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

#: Keep in step with the ``trl`` extra in pyproject.toml (a test checks that they agree).
TRL_TESTED_RANGE = ">=1.16,<1.17"
ALLOW_UNTESTED_ENV = "DOPD_ALLOW_UNTESTED_TRL"


class TRLVersionError(ImportError):
    """The installed TRL is outside the range this integration is tested against."""


def check_trl_version(version: Optional[str] = None) -> str:
    """Raise :class:`TRLVersionError` unless ``version`` (default: the installed TRL's) is in the tested range.

    Returns the version checked. Pre-releases of a tested release (``1.16.1.dev0``) count as in range.
    """
    if version is None:
        import trl

        version = getattr(trl, "__version__", "unknown")
    try:
        ok = SpecifierSet(TRL_TESTED_RANGE).contains(Version(version), prereleases=True)
    except InvalidVersion:
        ok = False
    if not ok:
        msg = (f"dopd.integrations.trl is tested with trl{TRL_TESTED_RANGE}, but trl {version} is installed: "
               f'install a tested release (pip install "dopd[trl]"), or set {ALLOW_UNTESTED_ENV}=1 to try anyway')
        if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        else:
            raise TRLVersionError(msg)
    return version
