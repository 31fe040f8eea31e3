"""The app's runtime requirements for a container image whose base already has Flower.

``python image_requirements.py pyproject.toml > requirements.txt`` prints ``[project].dependencies``
one per line, less ``flwr`` itself (the flwr/superexec base image has it at the pinned version, and
its ``[simulation]`` extra, Ray, is not needed outside the simulation). The Dockerfile uses it so the
image follows pyproject.toml without a second list to keep in step. Standard library only (the base
image has no ``packaging``), Python >= 3.11 for tomllib.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

SKIP = {"flwr"}
"""Distributions the base image provides."""


def requirement_name(requirement: str) -> str:
    """``"flwr[simulation]>=1.41"`` -> ``"flwr"`` (normalized as pip does)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def image_requirements(pyproject: Path) -> list[str]:
    with pyproject.open("rb") as fh:
        deps = tomllib.load(fh)["project"]["dependencies"]
    return [d for d in deps if requirement_name(d) not in SKIP]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0] if args else "pyproject.toml")
    print("\n".join(image_requirements(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
