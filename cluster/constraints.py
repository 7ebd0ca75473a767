"""Print cluster/constraints.txt: every distribution that `zooselect[test,models,plots]` needs,
walked recursively from the installed metadata (markers evaluated for this Python), pinned at
the version installed here (local suffixes such as +cu130 dropped).

    python -m cluster.constraints > cluster/constraints.txt
"""

from __future__ import annotations

import platform
import sys
from importlib.metadata import distribution

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT, EXTRAS = "zooselect", ("test", "models", "plots")
SKIP = {"zooselect", "pip", "setuptools", "wheel"}


def pins(root: str = ROOT, extras: tuple[str, ...] = EXTRAS) -> dict[str, str]:
    """{canonical name: installed version} of the closure of `root[extras]`."""
    out: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(root, frozenset(extras))]
    while todo:
        name, wanted = todo.pop()
        key = (canonicalize_name(name), wanted)
        if key in seen or (key[0] in SKIP and key[0] != canonicalize_name(root)):
            continue
        seen.add(key)
        dist = distribution(name)
        if key[0] not in SKIP:
            out[key[0]] = dist.version.split("+")[0]
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in wanted or {""}):
                todo.append((req.name, frozenset(req.extras)))
    return out


def main() -> int:
    py = f"{platform.python_implementation()} {sys.version_info.major}.{sys.version_info.minor}"
    print(f"# Pins for reproducible installs: every package that zooselect[{','.join(EXTRAS)}] installs, at the\n"
          f"# versions tested ({py}, {platform.system()} {platform.machine()}; the KubeRay image's Python).\n"
          "# Use with `pip install -c cluster/constraints.txt ...`. Regenerate in an environment with\n"
          "# the wanted versions installed: python -m cluster.constraints > cluster/constraints.txt")
    for name, version in sorted(pins().items()):
        print(f"{name}=={version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
