"""MiT-B0…B5: pyramid shapes, parameter counts (transformers and the paper), and checkpoints saved by
transformers / NVlabs loaded and compared feature by feature with the reference implementation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from segplat.errors import CheckpointError, ConfigError
from segplat.models.convert.mit import convert_mit_state_dict, to_nvlabs_state_dict
from segplat.models.encoders.mit import (
    MIT_SETTINGS,
    build_mit,
    mit_b0,
    mit_b1,
    mit_b2,
)
from segplat.models.weights import adapt_input_weight
from tests.models.base_tester import refusal

transformers = pytest.importorskip("transformers")
SegformerConfig = transformers.SegformerConfig
SegformerModel = transformers.SegformerModel

# encoder sizes in the SegFormer paper (Table 1, millions of parameters; B0 printed with one decimal)
PAPER_ENCODER_M = {"mit_b0": 3.3, "mit_b1": 13.1, "mit_b2": 24.2, "mit_b3": 44.0, "mit_b4": 60.8, "mit_b5": 81.4}


def hf_config(name: str) -> SegformerConfig:
    dims, depths = MIT_SETTINGS[name]
    return SegformerConfig(hidden_sizes=list(dims), depths=list(depths),
                           decoder_hidden_size=256 if name in ("mit_b0", "mit_b1") else 768, num_labels=5)


def reference_features(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(pixel_values=x, output_hidden_states=True).hidden_states


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_pyramid_strides_and_channels() -> None:
    model = mit_b0().eval()
    assert model.out_channels == [32, 64, 160, 256] and model.reductions == [4, 8, 16, 32]
    with torch.no_grad():
        feats = model(torch.randn(2, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(2, 32, 16, 24), (2, 64, 8, 12), (2, 160, 4, 6), (2, 256, 2, 3)]
    with torch.no_grad():  # sizes that are not multiples of 32 round up, as the strided convs do
        odd = model(torch.randn(1, 3, 50, 70))
    assert [f.shape[-2:] for f in odd] == [(13, 18), (7, 9), (4, 5), (2, 3)]


@pytest.mark.parametrize("in_chans", [1, 4, 13])
def test_any_number_of_input_channels(in_chans: int) -> None:
    model = mit_b0(in_chans=in_chans).eval()
    assert model.stages[0].embed.proj.in_channels == in_chans
    with torch.no_grad():
        assert model(torch.randn(1, in_chans, 32, 32))[-1].shape == (1, 256, 1, 1)


def test_configuration_matches_segformer() -> None:
    b1 = mit_b1()
    assert b1.out_channels == [64, 128, 320, 512]  # the CMX code's mit_b1 builds B0 dims: not here
    assert [len(s.blocks) for s in mit_b2().stages] == [3, 4, 6, 3]
    stage = b1.stages[2]
    assert stage.blocks[0].attn.heads == 5 and stage.blocks[0].attn.sr_ratio == 2
    assert stage.embed.proj.kernel_size == (3, 3) and stage.embed.proj.stride == (2, 2)
    assert b1.stages[0].embed.proj.kernel_size == (7, 7) and b1.stages[0].embed.proj.stride == (4, 4)
    assert stage.blocks[0].mlp.fc1.out_features == 4 * 320 and stage.blocks[0].mlp.dwconv.groups == 4 * 320
    assert stage.blocks[0].norm1.eps == 1e-6
    rates = [blk.drop_path.drop_prob for s in b1.stages for blk in s.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1) and rates == sorted(rates)
    assert not hasattr(b1.stages[3].blocks[0].attn, "sr")  # ratio 1 in the last stage


def test_bad_variant_name_lists_the_valid_ones() -> None:
    from segplat.models.cmx import CMX
    from segplat.models.dualstream import DualStream

    assert refusal(CMX, {"backbone": "mit_b9"}) == ("model.backbone=mit_b9 is not known; did you mean "
                                                    "model.backbone=mit_b5? (the options: mit_b0, mit_b1, mit_b2, "
                                                    "mit_b3, mit_b4 or mit_b5).")
    vision = {"_target_": "segplat.models.encoders.mit.mit_b1", "_partial_": True, "drop_path_rat": 0.1}
    assert refusal(DualStream, {"vision_encoder": vision}) == ("model.vision_encoder.drop_path_rat is not a key of "
                                                               "model.vision_encoder; did you mean "
                                                               "model.vision_encoder.drop_path_rate?")


@pytest.mark.parametrize("name", list(MIT_SETTINGS))
def test_parameter_count_matches_transformers_and_paper(name: str) -> None:
    with torch.device("meta"):  # counting needs no memory or initialisation
        ours, ref = build_mit(name), SegformerModel(hf_config(name))
    assert n_params(ours) == n_params(ref)
    assert abs(n_params(ours) / 1e6 - PAPER_ENCODER_M[name]) < 0.08


@pytest.fixture(scope="module")
def hf_b0(tmp_path_factory: pytest.TempPathFactory) -> tuple[SegformerModel, Path]:
    torch.manual_seed(0)
    ref = SegformerModel(hf_config("mit_b0")).eval()
    folder = tmp_path_factory.mktemp("hf_b0")
    ref.save_pretrained(folder, safe_serialization=True)
    return ref, folder


def test_transformers_save_pretrained_gives_the_reference_features(hf_b0) -> None:
    ref, folder = hf_b0
    assert (folder / "model.safetensors").is_file()
    ours = mit_b0(pretrained=folder).eval()
    assert ours.load_report["missing"] == [] and ours.load_report["unexpected"] == []
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = ours(x)
    for f, r in zip(feats, reference_features(ref, x), strict=True):
        torch.testing.assert_close(f, r, atol=1e-5, rtol=1e-5)


def test_semantic_segmentation_bin_gives_the_reference_features(hf_b0, tmp_path: Path) -> None:
    """A SegformerForSemanticSegmentation state dict (in-memory key names, `segformer.` prefix, a decode head)."""
    base, _ = hf_b0
    seg = transformers.SegformerForSemanticSegmentation(hf_config("mit_b0"))
    seg.segformer.load_state_dict(base.state_dict())
    seg.eval()
    path = tmp_path / "pytorch_model.bin"
    torch.save(seg.state_dict(), path)
    ours = mit_b0(pretrained=path).eval()
    report = ours.load_report
    assert report["missing"] == [] and report["unexpected"] == []
    assert report["ignored_heads"] and all(k.startswith("decode_head.") for k in report["ignored_heads"])
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        feats = ours(x)
        ref = seg.segformer(pixel_values=x, output_hidden_states=True).hidden_states
    for f, r in zip(feats, ref, strict=True):
        torch.testing.assert_close(f, r, atol=1e-5, rtol=1e-5)


def test_explicit_eps_is_kept_and_stays_close(hf_b0) -> None:
    """norm_eps=1e-6 (the NVlabs setting) is not switched by a transformers checkpoint; features stay close."""
    ref, folder = hf_b0
    ours = mit_b0(pretrained=folder, norm_eps=1e-6).eval()
    assert ours.stages[0].blocks[0].norm1.eps == 1e-6
    assert mit_b0(pretrained=folder).stages[0].blocks[0].norm1.eps == 1e-5  # auto: transformers' eps
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for f, r in zip(ours(x), reference_features(ref, x)):
            torch.testing.assert_close(f, r, atol=2e-4, rtol=1e-4)


def test_first_conv_is_adapted_for_other_channel_counts(hf_b0) -> None:
    ref, folder = hf_b0
    w3 = ref.state_dict()["stages.0.patch_embeddings.proj.weight"]
    for c in (1, 4):
        ours = mit_b0(in_chans=c, pretrained=folder)
        assert ours.load_report["adapted"] == ["stages.0.embed.proj.weight"]
        torch.testing.assert_close(ours.stages[0].embed.proj.weight.data, adapt_input_weight(w3, c))
    # 6 channels = RGB twice, each scaled by 1/2: the output equals the reference on the 3-channel average
    ours6 = mit_b0(in_chans=6, pretrained=folder).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours6(torch.cat([x, x], 1))[-1], reference_features(ref, x)[-1],
                                   atol=1e-5, rtol=1e-5)


def test_nvlabs_mmseg_keys_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    src = mit_b0().eval()
    nv = to_nvlabs_state_dict(src)
    assert "patch_embed1.proj.weight" in nv and "block1.0.attn.q.weight" in nv and "block4.1.mlp.dwconv.dwconv.bias" \
        in nv and "norm4.weight" in nv and "block1.0.attn.norm.weight" in nv
    mmseg = {f"backbone.{k}": v for k, v in nv.items()}
    mmseg["decode_head.conv_seg.weight"] = torch.zeros(2, 256, 1, 1)
    path = tmp_path / "mmseg.pth"
    torch.save({"state_dict": mmseg, "meta": {}}, path)
    dst = mit_b0(pretrained=path).eval()
    assert dst.load_report["missing"] == [] and dst.load_report["unexpected"] == []
    assert dst.stages[0].blocks[0].norm1.eps == 1e-6  # NVlabs weights keep the NVlabs eps
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(src(x), dst(x)):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    plain = tmp_path / "mit_b0.pth"  # an ImageNet MiT file: classifier head, no prefix
    torch.save({**nv, "head.weight": torch.zeros(1000, 256), "head.bias": torch.zeros(1000)}, plain)
    assert mit_b0(pretrained=plain).load_report["ignored_heads"] == ["head.weight", "head.bias"]


def test_missing_and_unexpected_keys_are_reported(tmp_path: Path) -> None:
    state = to_nvlabs_state_dict(mit_b0())
    state.pop("block4.1.mlp.fc2.weight")
    state["block9.0.foo.weight"] = torch.zeros(1)
    state["something_else"] = torch.zeros(1)
    torch.save(state, tmp_path / "partial.pth")
    report = mit_b0(pretrained=tmp_path / "partial.pth").load_report
    assert report["missing"] == ["stages.3.blocks.1.mlp.fc2.weight"]
    assert set(report["unexpected"]) == {"block9.0.foo.weight", "something_else"}


def test_wrong_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a file"):
        mit_b0(pretrained=tmp_path / "nope.safetensors")
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="no MiT/SegFormer encoder weights"):
        mit_b0(pretrained=tmp_path / "resnet.pth")
    torch.save(to_nvlabs_state_dict(mit_b1()), tmp_path / "b1.pth")
    with pytest.raises(CheckpointError, match="it holds mit_b1: set the backbone to mit_b1"):
        mit_b0(pretrained=tmp_path / "b1.pth")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ConfigError, match="save_pretrained folder"):
        mit_b0(pretrained=tmp_path / "empty_dir")


def test_key_conversion_merges_keys_and_values() -> None:
    k, v = torch.randn(32, 32), torch.randn(32, 32)
    out, unknown, _ = convert_mit_state_dict({
        "segformer.encoder.block.0.1.attention.self.key.weight": k,
        "segformer.encoder.block.0.1.attention.self.value.weight": v,
        "stages.2.blocks.0.attention.k_proj.bias": torch.zeros(4),  # v without k: reported
    })
    torch.testing.assert_close(out["stages.0.blocks.1.attn.kv.weight"], torch.cat([k, v]))
    assert unknown == ["stages.2.blocks.0.attn.kv.bias (only k)"]


def test_mit_b2_gives_the_reference_features(tmp_path: Path) -> None:
    torch.manual_seed(2)
    ref = SegformerModel(hf_config("mit_b2")).eval()
    ref.save_pretrained(tmp_path)
    ours = mit_b2(pretrained=tmp_path).eval()
    assert ours.load_report["missing"] == [] and ours.load_report["unexpected"] == []
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for f, r in zip(ours(x), reference_features(ref, x), strict=True):
            torch.testing.assert_close(f, r, atol=1e-5, rtol=1e-5)


def test_train_mode_drop_path_and_backward() -> None:
    torch.manual_seed(0)
    model = mit_b0(drop_path_rate=0.5).train()
    x = torch.randn(4, 3, 32, 32)
    a, b = model(x)[-1], model(x)[-1]
    assert not torch.allclose(a, b), "stochastic depth must be active in training"
    a.mean().backward()
    assert model.stages[0].embed.proj.weight.grad is not None
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x)[-1], model(x)[-1])


def test_plugs_into_the_generic_segmenter_and_reloads_from_a_segformer_state(tmp_path: Path) -> None:
    """`out_channels`/`reductions`/`in_chans` are all the Segmenter needs (mid fusion: one MiT per modality)."""
    import functools

    from segplat.models import Segmenter
    from segplat.models.decoders.segformer_head import SegFormerHead
    from segplat.models.segformer import SegFormer

    model = Segmenter({"rgb": 3, "nir": 1}, 4, functools.partial(build_mit, name="mit_b0"),
                      functools.partial(SegFormerHead, embed_dim=32), {"level": "mid"}).eval()
    with torch.no_grad():
        assert model({"rgb": torch.randn(1, 3, 64, 64), "nir": torch.randn(1, 1, 64, 64)})["out"].shape == \
            (1, 4, 64, 64)
    seg = SegFormer({"rgb": 3}, 4, backbone="mit_b0")
    torch.save({"model": seg.state_dict()}, tmp_path / "segplat.ckpt")  # a run's checkpoint layout
    enc = mit_b0(pretrained=tmp_path / "segplat.ckpt")
    assert enc.load_report["missing"] == [] and enc.load_report["unexpected"] == []
    torch.testing.assert_close(enc.stages[2].blocks[1].attn.kv.weight, seg.encoder.stages[2].blocks[1].attn.kv.weight)
