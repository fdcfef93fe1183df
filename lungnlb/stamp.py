"""When and from which code a result file was made: the date and commit every cited result carries."""

from __future__ import annotations

import subprocess
from datetime import datetime, timezone
from pathlib import Path

import lungnlb


def run_stamp() -> dict[str, str]:
    """{"date": UTC ISO time, "commit": short git commit of the checkout (or the package version)}."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        commit += "+changes" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        commit = f"lungnlb {lungnlb.__version__} (not a git checkout)"
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit}
