"""Which device guard was entered at each Triton launch (interpreter): a missing ``device_guard`` shows.

Triton launches on the current CUDA device, which need not be the tensors' (``devices.device_guard``). On a
CPU machine the guard is a no-op, so a path that forgot it would pass every numerical test: this recorder
stands in for ``device_guard`` in every ``dopd_kernels`` module that uses it and wraps the interpreter's
launch, noting for each launch the guards entered at that moment and its first tensor's device.
"""

from __future__ import annotations

import contextlib
import sys

import torch


@contextlib.contextmanager
def record_launch_guards():
    """Yields a list that fills with (kernel name, devices of the guards entered, first tensor's device)."""
    import dopd_kernels.triton.function  # noqa: F401  (the modules that take a guard, imported before patching)
    import dopd_kernels.vocab_parallel.loss  # noqa: F401
    from triton.runtime.interpreter import InterpretedFunction

    active: list[torch.device] = []
    launches: list[tuple[str, list, torch.device]] = []

    @contextlib.contextmanager
    def guard(device):
        active.append(torch.device(device))
        try:
            yield
        finally:
            active.pop()

    modules = [m for name, m in list(sys.modules.items())
               if name.startswith("dopd_kernels") and hasattr(m, "device_guard")]
    saved = [(m, m.device_guard) for m in modules]
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        first = next(a for a in args if isinstance(a, torch.Tensor))
        launches.append((self.fn.__name__, list(active), first.device))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    for m in modules:
        m.device_guard = guard
    InterpretedFunction.run = recording_run
    try:
        yield launches
    finally:
        InterpretedFunction.run = run
        for m, original in saved:
            m.device_guard = original


def unguarded(launches) -> list[str]:
    """The launches that ran outside a guard of their tensors' device."""
    return [name for name, guards, device in launches if not guards or guards[-1] != device]
