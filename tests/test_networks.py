"""Registry entries, output contract, size checks, attention maps, and a short overfit on a real slice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lungnlb.blocks import NonLocalBlock2d
from lungnlb.explain import attention_maps
from lungnlb.networks import build_model, is_segmentation_model, list_models, size_divisor
from lungnlb.networks.inference_form import inference_form

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NLB_MODELS = ["unet_nlb", "unet_localized_nlb", "unet_sb_nlb", "unet_sl_nlb"]
PAPER_MODELS = ["unet", "unet_sa", *NLB_MODELS, "unetpp", "resnet50", "efficientnet_b4"]


def test_registry_has_the_paper_models():
    assert set(PAPER_MODELS) <= set(list_models())


@pytest.mark.parametrize("name", list_models())
def test_output_keys_and_shapes(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    size = max(size_divisor(name), 64)
    with torch.no_grad():
        output = model(torch.randn(1, 1, size, size))
    expected = {"seg", "cls"} if is_segmentation_model(name) else {"cls"}
    assert set(output) == expected
    assert output["cls"].shape == (1, 1)
    if "seg" in output:
        assert output["seg"].shape == (1, 1, size, size)
    assert all(torch.isfinite(value).all() for value in output.values())


@pytest.mark.parametrize("name", list_models())
def test_size_not_divisible_is_rejected_naming_size_and_divisor(name):
    divisor = size_divisor(name)
    bad = divisor * 2 + divisor // 2
    model = build_model(name).eval()
    with pytest.raises(ValueError, match=rf"{divisor}.*{bad}x{bad}|{bad}x{bad}.*{divisor}"):
        model(torch.randn(1, 1, bad, bad))


def test_size_divisor_follows_levels_and_grid():
    assert size_divisor("unet") == 16
    assert size_divisor("unet_nlb", nlb_levels=(3,), grid=8) == 64
    assert size_divisor("unet_sl_nlb", nlb_levels=(2,), grid=4) == 32  # symmetric: even cell height
    assert build_model("unet_nlb", nlb_levels=(1,), grid=4).size_divisor == size_divisor("unet_nlb", nlb_levels=(1,), grid=4)


def test_unknown_model_is_rejected_with_the_known_names():
    with pytest.raises(ValueError, match="unet_sl_nlb"):
        build_model("unet_transformer")


def test_in_channels_is_honoured():
    output = build_model("unet_sl_nlb", in_channels=3).eval()(torch.randn(1, 3, 128, 128))
    assert output["seg"].shape == (1, 1, 128, 128)


@pytest.mark.parametrize("name", NLB_MODELS)
def test_nlb_unet_is_the_unet_backbone_plus_blocks(name):
    unet_keys = set(build_model("unet").state_dict())
    model = build_model(name)
    keys = set(model.state_dict())
    assert unet_keys <= keys
    assert all(key.startswith("nlb.") for key in keys - unet_keys)
    blocks = [module for module in model.modules() if isinstance(module, NonLocalBlock2d)]
    assert len(blocks) == 2 and {block.grid for block in blocks} == {8}


def test_unet_computes_monai_basicunet_and_keeps_its_state_dict_keys():
    # the inference path (group-norm kernel for instance norm, no zero padding in the decoder) and the
    # training path (instance norm, no padding) against stock MONAI BasicUNet (nn.InstanceNorm2d, NCHW) with the same weights
    from monai.networks.nets import BasicUNet

    torch.manual_seed(0)
    stock = BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, features=(32, 32, 64, 128, 256, 32))
    model = build_model("unet")
    assert set(model.unet.state_dict()) == set(stock.state_dict())
    with torch.no_grad():  # non-trivial norm affine parameters
        for name, parameter in stock.named_parameters():
            if ".N." in name:
                parameter.copy_(torch.rand(parameter.shape) + 0.5 if name.endswith("weight") else torch.randn(parameter.shape))
    model.unet.load_state_dict(stock.state_dict())
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(inference_form(model)(x)["seg"], stock.eval()(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.eval()(x)["seg"], stock.eval()(x), rtol=1e-5, atol=1e-5)
    model.train()(x)["seg"].square().mean().backward()
    stock.train()(x).square().mean().backward()
    grads = dict(stock.named_parameters())
    for name, parameter in model.unet.named_parameters():
        torch.testing.assert_close(parameter.grad, grads[name].grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_fast_instance_norm_matches_float64_instance_norm(memory_format):
    from lungnlb.networks.instance_norm import FastInstanceNorm2d

    generator = torch.Generator().manual_seed(0)
    norm = FastInstanceNorm2d(8, affine=True)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(8, generator=generator) + 0.5)
        norm.bias.copy_(torch.randn(8, generator=generator))
    # channel means of up to 200 standard deviations: a one-pass float32 variance fails here
    x = torch.randn(2, 8, 48, 48, generator=generator) + 200 * torch.rand(1, 8, 1, 1, generator=generator)
    expected = F.instance_norm(x.double(), weight=norm.weight.double(), bias=norm.bias.double(), eps=norm.eps)
    with torch.no_grad():
        y = norm(x.contiguous(memory_format=memory_format))
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=1e-4)
    assert set(norm.state_dict()) == {"weight", "bias"}


def test_inference_form_is_an_explicit_converted_copy():
    """`inference_form` converts a copy (channels_last, group-norm kernel, fused block projections):
    same outputs, the given model untouched and still trainable; the copy refuses training."""
    from lungnlb.networks.instance_norm import FastInstanceNorm2d

    torch.manual_seed(0)
    model = build_model("unet_sl_nlb", grid=4).eval()
    fast = inference_form(model)
    layouts = []
    for net in (fast, model):
        net.unet.down_1.register_forward_hook(
            lambda module, inputs, output: layouts.append(output.is_contiguous(memory_format=torch.channels_last)))
    x = torch.randn(2, 1, 128, 128)
    with torch.no_grad():
        converted, plain = fast(x), model(x)
    assert layouts == [True, False]  # no_grad alone does not switch the plain model to the fast form
    torch.testing.assert_close(converted["seg"], plain["seg"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(converted["cls"], plain["cls"], rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, FastInstanceNorm2d) for m in model.modules())
    assert not any(getattr(m, "fast_inference", False) for m in model.modules())
    assert any(isinstance(m, FastInstanceNorm2d) for m in fast.modules())
    assert not fast.training and not any(p.requires_grad for p in fast.parameters())
    assert fast.state_dict().keys() == model.state_dict().keys()
    model.train()(x)["seg"].mean().backward()  # the original trains as before
    fast.requires_grad_(True)
    with pytest.raises(RuntimeError, match="inference only"):
        fast(x)


def test_unetpp_computes_monai_unetplusplus_without_hooks_or_state():
    from lungnlb.networks.baselines import UNetPlusPlusSegCls

    torch.manual_seed(0)
    model = UNetPlusPlusSegCls().eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        first, second = model(x), model(x[:1])
        torch.testing.assert_close(first["seg"], model.net(x)[-1])
    torch.testing.assert_close(second["cls"], first["cls"][:1], rtol=1e-5, atol=1e-5)  # nothing carried between calls
    assert not any(module._forward_hooks for module in model.modules())
    assert not any(isinstance(value, list) for value in vars(model).values())


def test_nlb_unet_equals_unet_at_initialisation():
    # the blocks start as the identity, so with the same backbone weights the outputs agree
    unet, nlb = build_model("unet").eval(), build_model("unet_sl_nlb").eval()
    nlb.load_state_dict(unet.state_dict(), strict=False)
    x = torch.randn(1, 1, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(nlb(x)["seg"], unet(x)["seg"])


def test_attention_maps_one_per_block_in_unit_range():
    maps = attention_maps(build_model("unet_sl_nlb"), torch.randn(1, 1, 128, 128))
    assert set(maps) == {"level2", "level3"}
    for heat in maps.values():
        assert heat.shape == (128, 128) and heat.dtype == np.float32
        assert 0.0 <= heat.min() and heat.max() <= 1.0 and np.isclose(heat.max(), 1.0, atol=0.05)


def test_attention_maps_empty_without_blocks():
    assert attention_maps(build_model("unet"), torch.randn(1, 1, 64, 64)) == {}


def real_slice(size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The LIDC slice with the largest nodule mask in the first npz file, resized to size x size."""
    files = sorted((DATA / "lidc-idri" / "slices").glob("*.npz"))
    assert files, f"no LIDC npz slices under {DATA / 'lidc-idri' / 'slices'}"
    with np.load(files[0]) as archive:
        images, masks = archive["images"], archive["masks"]
    index = int(masks.reshape(len(masks), -1).sum(axis=1).argmax())
    image = torch.from_numpy(images[index].astype(np.float32))[None, None]
    mask = torch.from_numpy(masks[index].astype(np.float32))[None, None]
    image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
    mask = (F.interpolate(mask, size=(size, size), mode="area") > 0.25).float()
    assert mask.sum() > 0, f"the nodule of {files[0].name} vanished at {size}x{size}"
    return image, mask


@pytest.mark.slow
def test_overfit_one_real_slice_loss_falls():
    torch.manual_seed(0)
    image, mask = real_slice(size=64)
    model = build_model("unet_sl_nlb", grid=4)  # both blocks (levels 2 and 3) on a 64x64 input
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        optimiser.zero_grad()
        output = model(image)
        loss = F.binary_cross_entropy_with_logits(output["seg"], mask) + F.binary_cross_entropy_with_logits(
            output["cls"], torch.ones(1, 1)
        )
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:2]), f"loss did not fall: {losses}"
    probability = torch.sigmoid(output["seg"].detach())
    inside, outside = probability[mask > 0].mean(), probability[mask == 0].mean()
    assert inside > outside, f"nodule not separated from background: {inside:.3f} inside vs {outside:.3f} outside"
