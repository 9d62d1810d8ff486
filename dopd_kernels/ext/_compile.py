"""Child process of ``builder.build``: compile with ``torch.utils.cpp_extension.load`` (ninja), then load once.

Run as ``python _compile.py '<json job>'``; its stdout/stderr are the build log. Self-contained on purpose (it
does not import dopd_kernels), so a broken checkout still gets a readable log.
"""

import json
import sys
import time

from torch.utils import cpp_extension


def main() -> None:
    job = json.loads(sys.argv[1])
    started = time.monotonic()
    print(f"dopd extension: compiling {len(job['sources'])} sources into {job['directory']}", flush=True)
    path = cpp_extension.load(
        name=job["name"], sources=job["sources"], extra_cflags=job["cflags"], extra_ldflags=job.get("ldflags") or None,
        extra_cuda_cflags=job["cuda_cflags"] or None, build_directory=job["directory"],
        with_cuda=job["with_cuda"], is_python_module=False, verbose=True,
    )
    print(f"dopd extension: built and loaded {path} in {time.monotonic() - started:.1f} s", flush=True)


if __name__ == "__main__":
    main()
