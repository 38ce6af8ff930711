"""Check the built sdist and wheel: LICENSE, py.typed and every module of the source tree.

Usage: python .ci/check_dist.py DIST_DIR  (run from the repository root)
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path


def main(dist: Path) -> None:
    (wheel,) = dist.glob("attnblocks-*.whl")
    (sdist,) = dist.glob("attnblocks-*.tar.gz")
    sources = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "attnblocks"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    package_files = {s for s in sources if s.endswith((".py", ".typed"))}

    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    wheel_problems = sorted(package_files - in_wheel)
    if not any(n.endswith(".dist-info/licenses/LICENSE") for n in in_wheel):
        wheel_problems.append("*.dist-info/licenses/LICENSE")
    stray = sorted(n for n in in_wheel if not n.startswith("attnblocks"))
    if stray:
        wheel_problems.append(f"files outside the package: {stray}")

    with tarfile.open(sdist) as tar:
        root = tar.getnames()[0].split("/")[0]
        in_sdist = {n.removeprefix(root + "/") for n in tar.getnames()}
    sdist_problems = sorted((package_files | {"LICENSE", "README.md", "pyproject.toml"}) - in_sdist)

    print(f"{wheel.name}: {len(in_wheel)} files; {sdist.name}: {len(in_sdist)} files")
    if wheel_problems or sdist_problems:
        sys.exit(
            f"missing from the wheel: {wheel_problems}\nmissing from the sdist: {sdist_problems}"
        )
    print(f"both carry LICENSE and all {len(package_files)} files of attnblocks/")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
