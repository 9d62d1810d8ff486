"""dopd: a thin trainer and the ``dopd`` command for DOPD (Dual On-policy Distillation).

The loss lives in ``dopd_kernels``; this package samples from the student, runs the three forward
passes, aligns response positions, calls ``routed_loss`` and steps the optimizer. Submodules import
transformers lazily, so ``import dopd`` stays light.
"""

__version__ = "0.1.0"
