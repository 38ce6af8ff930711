"""Run folders of the example's scripts: a new one never clobbers, a resumed one keeps its args."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["new_run_dir", "resume_hint", "saved_args"]


def new_run_dir(run_dir: Path, *, overwrite: bool, stale: tuple[str, ...]) -> Path:
    """Create ``run_dir``; refuse a non-empty one unless ``overwrite``.

    With ``overwrite`` the files in the ``stale`` subfolders (e.g. the old checkpoints,
    which a new run would otherwise resume from) are deleted.
    """
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise SystemExit(
            f"run folder {run_dir} exists and is not empty; pass --overwrite to reuse it, "
            f"--resume {run_dir} to continue it, or choose another --out."
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for folder in stale:
            for f in (run_dir / folder).glob("*"):
                f.unlink()
    return run_dir


def saved_args(run_dir: Path) -> dict[str, Any]:
    """The ``args`` saved in ``run_dir``'s config.json, for ``--resume``."""
    config = run_dir / "config.json"
    if not config.exists():
        raise SystemExit(f"--resume {run_dir}: no config.json there; is it a run folder?")
    args: dict[str, Any] = json.loads(config.read_text())["args"]
    return args


def resume_hint(err: Exception, run_dir: Path | None) -> str:
    """What to print when a run was interrupted: the reason and the command that continues it.

    >>> err = KeyboardInterrupt("interrupted at step 3")
    >>> print(resume_hint(err, Path("runs/a")))  # doctest: +ELLIPSIS
    <BLANKLINE>
    interrupted at step 3; a checkpoint was written. Continue with:
      python ... --resume runs/a
    """
    return (
        f"\n{err}; a checkpoint was written. Continue with:\n"
        f"  python {sys.argv[0]} --resume {run_dir}"
    )
