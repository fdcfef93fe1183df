"""The publish gate: may a newly trained model replace the one in use?

A run publishes only if

* its weights are finite (a diverged run, e.g. learning rate 1e30, never publishes), and
* it was validated on at least `min_val_slices` slices (fewer say too little to compare), and
* its validation segmentation Dice is above the incumbent's on the same slices — a tie keeps the
  incumbent, which has been in use and whose proposals annotators already corrected against;

or when `force` is set (a deliberate override, e.g. the first model of a new study set). With no
incumbent (nothing is served yet) the validation floor still applies. The decision carries a
sentence saying why, for the run's record.

Plain Python, no framework: the app's trainer and the library's training engine both call it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

MIN_VALIDATION_SLICES = 10


@dataclass(frozen=True)
class PublishDecision:
    """Whether to publish, why, and the numbers the decision was made on."""

    publish: bool
    reason: str
    candidate_dice: float | None
    incumbent_dice: float | None
    val_slices: int
    forced: bool = False

    def as_record(self) -> dict[str, Any]:
        return asdict(self)


def decide_publication(
    candidate_dice: float | None,
    incumbent_dice: float | None,
    val_slices: int,
    *,
    weights_finite: bool = True,
    force: bool = False,
    min_val_slices: int = MIN_VALIDATION_SLICES,
) -> PublishDecision:
    """Apply the gate (see the module docstring) to one candidate model.

    `candidate_dice` / `incumbent_dice`: mean validation Dice of the new model and of the model in
    use, on the same `val_slices` validation slices (None: not measured; no incumbent).
    """
    numbers = {"candidate_dice": candidate_dice, "incumbent_dice": incumbent_dice, "val_slices": val_slices}
    if force:
        return PublishDecision(True, "published because force was set (the gate was not applied)", forced=True, **numbers)
    if not weights_finite:
        return PublishDecision(False, "not published: the trained weights are not finite (the run diverged)", **numbers)
    if val_slices < min_val_slices:
        return PublishDecision(
            False,
            f"trained but not published: only {val_slices} validation slice(s), at least {min_val_slices} are needed "
            "to compare with the model in use (label more images, raise val_split, or set force)",
            **numbers,
        )
    if candidate_dice is None or not math.isfinite(candidate_dice):
        return PublishDecision(False, f"not published: validation Dice {candidate_dice} is not a number", **numbers)
    if incumbent_dice is None:
        return PublishDecision(True, f"published: validation Dice {candidate_dice:.4f}, no model was in use", **numbers)
    if candidate_dice > incumbent_dice:
        return PublishDecision(
            True, f"published: validation Dice {candidate_dice:.4f} > {incumbent_dice:.4f} of the model in use", **numbers
        )
    relation = "equals" if candidate_dice == incumbent_dice else "is below"
    return PublishDecision(
        False,
        f"not published: validation Dice {candidate_dice:.4f} {relation} the model in use's {incumbent_dice:.4f} "
        f"on the same {val_slices} slices (the model in use is kept; set force to publish anyway)",
        **numbers,
    )
