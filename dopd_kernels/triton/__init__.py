"""``backend="triton"``: the routed loss with fused Triton kernels (see ``function.py`` for the design).

Importing this package raises ImportError when Triton is not installed; ``api.py`` relies on that to
fall back to the PyTorch path. Set ``TRITON_INTERPRET=1`` before Triton is imported to run the kernels
on CPU tensors (slowly: tests only).
"""

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except Exception as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"dopd_kernels.triton needs the 'triton' package: {exc}") from exc

from . import interpreter_compat

interpreter_compat.apply()  # Triton < 3.9 under the interpreter with NumPy >= 2.4 (see the module)

from .function import triton_routed_loss  # noqa: E402

__all__ = ["triton_routed_loss"]
