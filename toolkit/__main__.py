"""``python -m toolkit``: same as the ``whisper-toolkit`` console script."""

from toolkit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
