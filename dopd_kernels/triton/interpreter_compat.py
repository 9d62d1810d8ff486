"""Triton's interpreter before 3.9 with NumPy >= 2.4: scalar tensors as loop bounds.

The interpreter keeps a scalar as a 1-element 1-D numpy array and, before Triton 3.9, converted it with
``int(array)`` when a kernel passes it to ``range`` (every runtime loop bound: ``range(0, vocab, BLOCK)``
with an int argument, a bound from ``tl.minimum`` or from a device-side count). NumPy 2.4 turned that
conversion (deprecated since 1.25) into a TypeError, so on Triton 3.6 every such loop fails under the
interpreter ("only 0-dimensional arrays can be converted to Python scalars"); compiled kernels are not
affected. Writing the loops as ``while`` loops would avoid it, but on the GPU Triton software-pipelines
only ``for`` loops (the GEMM loops need that), so instead the interpreter's ``tensor.__index__`` is given
Triton 3.9's definition (convert the single element). Applied once, for Triton < 3.9 only.
"""

from __future__ import annotations

import inspect


def _version(text: str) -> tuple[int, int]:
    parts = (text.split("+")[0].split(".") + ["0", "0"])[:2]
    return tuple(int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts)


def apply() -> bool:
    """Install the fix if this Triton needs it; True when installed (now or before)."""
    import triton

    if _version(triton.__version__) >= (3, 9):
        return False
    try:
        from triton.runtime import interpreter
    except Exception:  # pragma: no cover - a Triton without the interpreter module
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or len(inspect.signature(original).parameters) != 2:
        return False  # a layout this fix was not written for: leave it alone
    if getattr(original, "_dopd_index_fix", False):
        return True

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0])
                       if self.handle.data.size == 1 else int(self.handle.data))

    patch_lang_tensor._dopd_index_fix = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
