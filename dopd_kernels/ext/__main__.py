"""``python -m dopd_kernels.ext build | info | clean``: compile, describe or remove the cached extension build.

build: compile into the cache (nothing to do when the same build is there; ``--force`` recompiles, ``--verbose``
prints the compiler output), then load it once to check that the ops register. Exit 1 on a failed build, with the
compiler log's path; the package keeps working without the extension.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from . import BuildError, build, current_spec, is_available, load
from .builder import clean


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dopd_kernels.ext", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("build", "info", "clean"))
    parser.add_argument("--force", action="store_true", help="recompile even when the build is cached")
    parser.add_argument("--verbose", action="store_true", help="print the compiler output")
    parser.add_argument("--cpu-only", action="store_true", help="leave out the CUDA kernels")
    args = parser.parse_args(argv)
    spec = current_spec(cuda=False if args.cpu_only else None)
    if args.command == "info":
        state = "built" if spec.ready() else "not built"
        print(f"{spec.directory} ({state}; CUDA kernels: {spec.with_cuda}; sources: {len(spec.sources)})")
        if spec.ready():
            print(json.dumps(json.loads(spec.marker.read_text())))
        return 0
    if args.command == "clean":
        clean(spec)
        print(f"removed {spec.directory}")
        return 0
    started = time.monotonic()
    cached = spec.ready() and not args.force
    try:
        build(force=args.force, verbose=args.verbose, spec=spec)
    except BuildError as err:
        print(f"python -m dopd_kernels.ext build: error: {err}", file=sys.stderr)
        return 1
    if not (is_available() or load(spec)):
        print(f"python -m dopd_kernels.ext build: error: built {spec.library} but could not load it",
              file=sys.stderr)
        return 1
    what = "already built" if cached else f"built in {time.monotonic() - started:.0f} s"
    print(f"dopd extension {what}: {spec.library} (CUDA kernels: {spec.with_cuda})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
