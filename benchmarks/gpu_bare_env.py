"""Build a folder that holds only torch, triton, transformers and peft and what they depend on (symbolic
links into this interpreter's site-packages), to rehearse here the package set of the bare GPU machine that
benchmarks/gpu_check.sh targets. Run the rehearsal with `python -S` and PYTHONPATH=<folder>:...:

    python benchmarks/gpu_bare_env.py /tmp/bare [EXTRA...]   # prints the distributions linked

EXTRA: more distributions to link (gpu_check.sh adds pillow when this Python is not 3.12, as the carried
Pillow wheel is built for CPython 3.12 only).

Dependencies come from the installed distributions' metadata (Requires-Dist without extras, markers
evaluated for this interpreter), followed transitively.
"""
from __future__ import annotations

import importlib.metadata as md
import re
import sys
from pathlib import Path

BASE = ["torch", "triton", "transformers", "peft"]


def _name(req: str) -> str:
    return re.split(r"[\s;\[<>=!~(]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def closure(roots: list[str]) -> list[md.Distribution]:
    """The installed distributions `roots` and everything they require (no extras), transitively."""
    from packaging.requirements import Requirement

    seen: dict[str, md.Distribution] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen[name] = dist
        for req in dist.requires or []:
            r = Requirement(req)
            if r.marker is not None and not r.marker.evaluate({"extra": ""}):
                continue
            todo.append(_name(r.name))
    return list(seen.values())


def top_level(dist: md.Distribution) -> set[str]:
    """Top-level names (packages, modules, .so files, *.dist-info) the distribution installs."""
    names = set()
    for f in dist.files or []:
        first = f.parts[0]
        if first in ("..", "__pycache__") or first.endswith(".pth"):
            continue
        names.add(first)
    return names


def main(out: str, extra: list[str] = ()) -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    linked = []
    for dist in closure(BASE + list(extra)):
        root = Path(dist.locate_file(""))
        for name in top_level(dist):
            src, dst = root / name, out_dir / name
            if src.exists() and not dst.exists():
                dst.symlink_to(src)
        linked.append(f"{dist.metadata['Name']}=={dist.version}")
    print(" ".join(sorted(linked, key=str.lower)))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/mrpo_bare_site", sys.argv[2:])
