"""What Slicer's official MONAI Label module (monailabel 0.8.5, plugins/slicer/MONAILabel/MONAILabel.py)
reads from `/info` and needs in a form the app's own fields do not have.

Its training monitor (`monitorTraining`, while the run's status is RUNNING) shows
``0 if train_stats.get("total_time") else train_stats.get("epoch", 1)`` epochs of `total_epochs`
done: a `total_time` written during the run (as the trainer's stats give it, the time so far) makes
it show 0 epochs done until the run ends. `official_train_stats` therefore names the time of a run
that has not decided yet `elapsed_time`; `total_time` appears with the run's publish decision,
which the trainer writes last (`publish`, lib/trainers/fit.py).
"""

from __future__ import annotations

from typing import Any


def official_train_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """The stats as `/info` shows them: `total_time` only once the run has finished (see above)."""
    if not isinstance(stats, dict) or "total_time" not in stats or stats.get("publish") is not None:
        return stats
    shown = {key: value for key, value in stats.items() if key != "total_time"}
    shown["elapsed_time"] = stats["total_time"]
    return shown
