"""Deep supervision: auxiliary seg outputs in training mode only, and their terms in the loss."""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss
from train_helpers import TINY_KWARGS

from lungnlb.networks import build_model
from lungnlb.networks.inference_form import inference_form
from lungnlb.training.loss import MultiTaskLoss


def _models():
    torch.manual_seed(0)
    plain = build_model("unet_sl_nlb", **TINY_KWARGS)
    deep = build_model("unet_sl_nlb", **TINY_KWARGS, deep_supervision=True)
    missing, unexpected = deep.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(key.startswith("deep_heads.") for key in missing) and missing
    return plain, deep


def test_auxiliary_outputs_in_training_mode_only():
    plain, deep = _models()
    x = torch.rand(2, 1, 32, 32)
    trained = deep.train()(x)
    assert [tuple(s.shape) for s in trained["seg_deep"]] == [(2, 1, 16, 16), (2, 1, 8, 8)]
    deep.eval(), plain.eval()
    with torch.no_grad():
        served, reference = deep(x), plain(x)
    assert set(served) == {"seg", "cls"}
    assert torch.allclose(served["seg"], reference["seg"]) and torch.allclose(served["cls"], reference["cls"])
    assert set(inference_form(deep)(x)) == {"seg", "cls"}


def test_loss_adds_the_auxiliary_terms_at_their_sizes_and_trains_their_heads():
    _, deep = _models()
    x = torch.rand(2, 1, 32, 32)
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:20, 10:22] = 1
    batch = {"mask": mask, "has_mask": torch.tensor([True, False]), "label": torch.ones(2, 1),
             "has_label": torch.tensor([True, True])}
    criterion = MultiTaskLoss(batch_dice=True)
    output = deep.train()(x)
    total, parts = criterion(output, batch)
    dice_ce = DiceCELoss(sigmoid=True, batch=True)
    expected = dice_ce(output["seg"][:1], mask[:1]) + sum(
        weight * dice_ce(aux[:1], torch.nn.functional.interpolate(mask[:1], size=aux.shape[2:], mode="nearest-exact"))
        for weight, aux in zip((0.5, 0.25), output["seg_deep"]))
    assert abs(parts["seg"] - float(expected.detach())) < 1e-5
    without = criterion({key: output[key] for key in ("seg", "cls")}, batch)[1]["seg"]
    assert abs(without - float(dice_ce(output["seg"][:1], mask[:1]).detach())) < 1e-5
    total.backward()
    assert all(head.weight.grad.abs().sum() > 0 for head in deep.deep_heads)
