"""When, from which code and on how busy a machine a result file was made: the date and commit every
cited result carries, and the load average timed results carry."""

from __future__ import annotations

import os
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


def load_average() -> list[float]:
    """The machine's 1, 5 and 15 minute load: how much other work shared a timed result's seconds."""
    return [round(value, 2) for value in os.getloadavg()]
