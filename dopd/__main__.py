"""``python -m dopd`` is the ``dopd`` command."""

from dopd.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
