#!/usr/bin/env python
"""Regenerate MODEL_CARD.md from the bundled default model (training summary + a fresh evaluation on the held-out
real photos); `--check` exits 1 when the committed card differs."""

import argparse
import difflib
import sys
from pathlib import Path

from hf_hierseg.apps.model_card import default_model_card


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", default=str(Path(__file__).resolve().parents[1] / "MODEL_CARD.md"))
    parser.add_argument("--check", action="store_true", help="compare with --output instead of writing it")
    args = parser.parse_args(argv)
    text = default_model_card()
    path = Path(args.output)
    if args.check:
        current = path.read_text(encoding="utf-8") if path.is_file() else ""
        if current != text:
            sys.stdout.writelines(
                difflib.unified_diff(current.splitlines(True), text.splitlines(True), str(path), "generated")
            )
            return 1
        print(f"{path} matches the bundled model")
        return 0
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
