"""Pretrained timm weights come from a local file and adapt to any number of input channels."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from segplat.errors import ConfigError
from segplat.models.encoders import TimmEncoder
from segplat.models.weights import adapt_input_weight


def test_adapt_input_weight_keeps_activation_scale():
    w = torch.randn(8, 3, 3, 3)
    assert torch.equal(adapt_input_weight(w, 3), w)
    assert torch.allclose(adapt_input_weight(w, 1), w.sum(1, keepdim=True))
    w5 = adapt_input_weight(w, 5)
    assert w5.shape == (8, 5, 3, 3)
    assert torch.allclose(w5[:, 3:], w[:, :2] * 3 / 5) and torch.allclose(w5[:, :3], w * 3 / 5)
    # an input repeating the RGB planes gives the same response as the original on RGB
    x = torch.randn(1, 3, 8, 8)
    w6 = adapt_input_weight(w, 6)
    a = torch.nn.functional.conv2d(x, w)
    b = torch.nn.functional.conv2d(torch.cat([x, x], 1), w6)
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_encoder_loads_a_local_checkpoint_for_four_channels(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(0)
    reference = timm.create_model("resnet10t", pretrained=False)
    state = reference.state_dict()
    path = tmp_path / f"resnet10t{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state}, path)
    enc = TimmEncoder("resnet10t", in_chans=4, pretrained=str(path))
    own = enc.model.state_dict()
    first = next(k for k in own if own[k].ndim == 4)
    assert own[first].shape[1] == 4
    assert torch.allclose(own[first], adapt_input_weight(state[first], 4))
    shared = [k for k in own if k in state and k != first]
    assert shared and all(torch.equal(own[k], state[k]) for k in shared)


def test_missing_weights_file_is_named():
    with pytest.raises(ConfigError, match=r"no_such_file\.pth is not a file"):
        TimmEncoder("resnet10t", in_chans=3, pretrained="/nonexistent/no_such_file.pth")


def test_a_file_that_leaves_weights_at_random_init_is_refused(tmp_path: Path) -> None:
    """The non-strict load took a resnet18 file, or one with DDP's module. prefix, for a resnet10t without a word."""
    torch.manual_seed(0)
    state = timm.create_model("resnet10t", pretrained=False).state_dict()
    ddp = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, ddp)  # a prefix every key shares is taken off
    enc = TimmEncoder("resnet10t", in_chans=3, pretrained=str(ddp))
    assert all(torch.equal(v, state[k]) for k, v in enc.model.state_dict().items())
    other = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), other)
    junk = tmp_path / "junk.pth"
    torch.save({"foo.weight": torch.zeros(3)}, junk)
    for path in (other, junk):
        with pytest.raises(ConfigError, match=rf"^model encoder pretrained={path} does not fit the timm resnet10t: "
                                              r"\d+ of its \d+ weights are not in the file and \d+ have another shape"):
            TimmEncoder("resnet10t", in_chans=3, pretrained=str(path))
