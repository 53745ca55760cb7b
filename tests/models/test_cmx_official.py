"""Official CMX checkpoints load into `model=cmx` and give the official logits.

`OfficialCMX` below re-implements the official forward (huaaaliu/RGBX_Semantic_Segmentation:
models/builder.py `EncoderDecoder`, models/encoders/dual_segformer.py `RGBXTransformer`, models/net_utils.py
FRM/FFM, models/decoders/MLPDecoder.py `DecoderHead`), written for this test from reading that code, with the
official module names, so that its `state_dict()` is an official checkpoint. Its weights are random
everywhere (BatchNorm statistics included); the decoder BatchNorm has the official `C.bn_eps = 1e-3`.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from segplat.errors import CheckpointError
from segplat.models.cmx import CMX
from segplat.models.encoders.mit import MIT_SETTINGS

HEADS, SR = (1, 2, 5, 8), (8, 4, 2, 1)


# ------------------------------------------------------------------ the official structure and forward
class OverlapPatchEmbed(nn.Module):
    def __init__(self, patch: int, stride: int, cin: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cin, dim, patch, stride, patch // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, sr: int) -> None:
        super().__init__()
        self.heads, self.sr_ratio, self.scale = heads, sr, (dim // heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr > 1:
            self.sr = nn.Conv2d(dim, dim, sr, sr)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x, h, w):
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.heads, c // self.heads).permute(0, 2, 1, 3)
        if self.sr_ratio > 1:
            x = self.norm(self.sr(x.permute(0, 2, 1).reshape(b, c, h, w)).reshape(b, c, -1).permute(0, 2, 1))
        k, v = self.kv(x).reshape(b, -1, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class DWConv(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x, h, w):
        b, _, c = x.shape
        return self.dwconv(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.dwconv, self.fc2 = nn.Linear(dim, 4 * dim), DWConv(4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x, h, w):
        return self.fc2(F.gelu(self.dwconv(self.fc1(x), h, w)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, sr: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.mlp = Attention(dim, heads, sr), Mlp(dim)

    def forward(self, x, h, w):
        x = x + self.attn(self.norm1(x), h, w)
        return x + self.mlp(self.norm2(x), h, w)


class ChannelWeights(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(4 * dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, 2 * dim), nn.Sigmoid())

    def forward(self, x1, x2):
        b = x1.shape[0]
        x = torch.cat((x1, x2), dim=1)
        y = torch.cat((F.adaptive_avg_pool2d(x, 1).view(b, -1), F.adaptive_max_pool2d(x, 1).view(b, -1)), dim=1)
        return self.mlp(y).reshape(b, 2, self.dim, 1, 1).permute(1, 0, 2, 3, 4)


class SpatialWeights(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(2 * dim, dim, 1), nn.ReLU(), nn.Conv2d(dim, 2, 1), nn.Sigmoid())

    def forward(self, x1, x2):
        b, _, h, w = x1.shape
        return self.mlp(torch.cat((x1, x2), dim=1)).reshape(b, 2, 1, h, w).permute(1, 0, 2, 3, 4)


class FRM(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.channel_weights, self.spatial_weights = ChannelWeights(dim), SpatialWeights(dim)

    def forward(self, x1, x2):
        cw, sw = self.channel_weights(x1, x2), self.spatial_weights(x1, x2)
        return x1 + 0.5 * cw[1] * x2 + 0.5 * sw[1] * x2, x2 + 0.5 * cw[0] * x1 + 0.5 * sw[0] * x1


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.kv1, self.kv2 = nn.Linear(dim, 2 * dim, bias=False), nn.Linear(dim, 2 * dim, bias=False)

    def forward(self, x1, x2):
        b, n, c = x1.shape
        q1 = x1.reshape(b, -1, self.heads, c // self.heads).permute(0, 2, 1, 3)
        q2 = x2.reshape(b, -1, self.heads, c // self.heads).permute(0, 2, 1, 3)
        k1, v1 = self.kv1(x1).reshape(b, -1, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        k2, v2 = self.kv2(x2).reshape(b, -1, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        ctx1 = ((k1.transpose(-2, -1) @ v1) * self.scale).softmax(dim=-2)
        ctx2 = ((k2.transpose(-2, -1) @ v2) * self.scale).softmax(dim=-2)
        return (q1 @ ctx2).permute(0, 2, 1, 3).reshape(b, n, c), (q2 @ ctx1).permute(0, 2, 1, 3).reshape(b, n, c)


class CrossPath(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.channel_proj1, self.channel_proj2 = nn.Linear(dim, 2 * dim), nn.Linear(dim, 2 * dim)
        self.cross_attn = CrossAttention(dim, heads)
        self.end_proj1, self.end_proj2 = nn.Linear(2 * dim, dim), nn.Linear(2 * dim, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x1, x2):
        y1, u1 = F.relu(self.channel_proj1(x1)).chunk(2, dim=-1)
        y2, u2 = F.relu(self.channel_proj2(x2)).chunk(2, dim=-1)
        v1, v2 = self.cross_attn(u1, u2)
        return (self.norm1(x1 + self.end_proj1(torch.cat((y1, v1), dim=-1))),
                self.norm2(x2 + self.end_proj2(torch.cat((y2, v2), dim=-1))))


class ChannelEmbed(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.residual = nn.Conv2d(cin, cout, 1, bias=False)
        self.channel_embed = nn.Sequential(nn.Conv2d(cin, cout, 1), nn.Conv2d(cout, cout, 3, 1, 1, groups=cout),
                                           nn.ReLU(), nn.Conv2d(cout, cout, 1), nn.BatchNorm2d(cout))
        self.norm = nn.BatchNorm2d(cout)

    def forward(self, x, h, w):
        b, _, c = x.shape
        x = x.permute(0, 2, 1).reshape(b, c, h, w)
        return self.norm(self.residual(x) + self.channel_embed(x))


class FFM(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.cross, self.channel_emb = CrossPath(dim, heads), ChannelEmbed(2 * dim, dim)

    def forward(self, x1, x2):
        _, _, h, w = x1.shape
        x1, x2 = self.cross(x1.flatten(2).transpose(1, 2), x2.flatten(2).transpose(1, 2))
        return self.channel_emb(torch.cat((x1, x2), dim=-1), h, w)


class RGBXTransformer(nn.Module):
    def __init__(self, dims, depths) -> None:
        super().__init__()
        for s in range(4):
            cin, patch, stride = (3, 7, 4) if s == 0 else (dims[s - 1], 3, 2)
            for prefix in ("", "extra_"):
                self.add_module(f"{prefix}patch_embed{s + 1}", OverlapPatchEmbed(patch, stride, cin, dims[s]))
                self.add_module(f"{prefix}block{s + 1}",
                                nn.ModuleList(Block(dims[s], HEADS[s], SR[s]) for _ in range(depths[s])))
                self.add_module(f"{prefix}norm{s + 1}", nn.LayerNorm(dims[s], eps=1e-6))
        self.FRMs = nn.ModuleList(FRM(d) for d in dims)
        self.FFMs = nn.ModuleList(FFM(d, h) for d, h in zip(dims, HEADS))

    def forward(self, x_rgb, x_e):
        outs = []
        for s in range(4):
            b = x_rgb.shape[0]
            x_rgb, h, w = getattr(self, f"patch_embed{s + 1}")(x_rgb)
            x_e, _, _ = getattr(self, f"extra_patch_embed{s + 1}")(x_e)
            for blk in getattr(self, f"block{s + 1}"):
                x_rgb = blk(x_rgb, h, w)
            for blk in getattr(self, f"extra_block{s + 1}"):
                x_e = blk(x_e, h, w)
            x_rgb = getattr(self, f"norm{s + 1}")(x_rgb).reshape(b, h, w, -1).permute(0, 3, 1, 2)
            x_e = getattr(self, f"extra_norm{s + 1}")(x_e).reshape(b, h, w, -1).permute(0, 3, 1, 2)
            x_rgb, x_e = self.FRMs[s](x_rgb, x_e)
            outs.append(self.FFMs[s](x_rgb, x_e))
        return outs


class MLP(nn.Module):
    def __init__(self, cin: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(cin, dim)

    def forward(self, x):
        return self.proj(x.flatten(2).transpose(1, 2))


class DecoderHead(nn.Module):
    def __init__(self, dims, num_classes: int, embed: int = 512) -> None:
        super().__init__()
        for s, d in enumerate(dims):
            self.add_module(f"linear_c{s + 1}", MLP(d, embed))
        self.linear_fuse = nn.Sequential(nn.Conv2d(4 * embed, embed, 1), nn.BatchNorm2d(embed, eps=1e-3), nn.ReLU())
        self.dropout = nn.Dropout2d(0.1)
        self.linear_pred = nn.Conv2d(embed, num_classes, 1)

    def forward(self, feats):
        n, size = feats[0].shape[0], feats[0].shape[2:]
        maps = []
        for s in (3, 2, 1, 0):
            f = feats[s]
            y = getattr(self, f"linear_c{s + 1}")(f).permute(0, 2, 1).reshape(n, -1, *f.shape[2:])
            maps.append(F.interpolate(y, size=size, mode="bilinear", align_corners=False) if s else y)
        return self.linear_pred(self.dropout(self.linear_fuse(torch.cat(maps, dim=1))))


class OfficialCMX(nn.Module):
    """`EncoderDecoder` with `backbone` and `decode_head`; `forward(rgb, modal_x)` gives logits at the input size."""

    def __init__(self, variant: str, num_classes: int) -> None:
        super().__init__()
        dims, depths = MIT_SETTINGS[variant]
        self.backbone = RGBXTransformer(dims, depths)
        self.decode_head = DecoderHead(dims, num_classes)

    def forward(self, rgb, modal_x):
        out = self.decode_head(self.backbone(rgb, modal_x))
        return F.interpolate(out, size=rgb.shape[2:], mode="bilinear", align_corners=False)


def randomised(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("weight") and t.ndim == 1:  # norms: around 1
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
            else:
                fan_in = math.prod(t.shape[1:]) if t.ndim > 1 else 16
                t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(fan_in))
    return model.eval()


def official_checkpoint(tmp_path: Path, variant: str, num_classes: int = 5, seed: int = 0) -> tuple[nn.Module, Path]:
    """The official file layout: {"model": state_dict, "optimizer": ..., "epoch": ..., "iteration": ...}."""
    ref = randomised(OfficialCMX(variant, num_classes), seed)
    path = tmp_path / f"cmx_{variant}.pth"
    torch.save({"model": ref.state_dict(), "optimizer": {"state": {}, "param_groups": [{"lr": 6e-5, "params": [0]}]},
                "epoch": 3, "iteration": 1200}, path)
    return ref, path


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("variant", ["mit_b0", pytest.param("mit_b2", marks=pytest.mark.slow)])
def test_official_checkpoint_gives_the_official_logits(variant: str, tmp_path: Path) -> None:
    ref, path = official_checkpoint(tmp_path, variant)
    ours = CMX({"rgb": 3, "hha": 3}, 5, backbone=variant, pretrained=str(path)).eval()
    assert ours.load_report == {"missing": [], "unexpected": [], "adapted": [], "skipped": []}
    assert ours.decoder.fuse[0].bias is not None and ours.decoder.fuse[1].eps == 1e-3
    torch.manual_seed(1)
    rgb, x = torch.randn(2, 3, 64, 96), torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected, out = ref(rgb, x), ours({"rgb": rgb, "hha": x})["out"]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_one_band_x_stream_equals_the_band_repeated_to_three(tmp_path: Path) -> None:
    ref, path = official_checkpoint(tmp_path, "mit_b0", seed=2)
    ours = CMX({"rgb": 3, "depth": 1}, 5, backbone="mit_b0", pretrained=str(path)).eval()
    assert ours.load_report["adapted"] == ["encoders.1.stages.0.embed.proj.weight"]
    rgb, depth = torch.randn(1, 3, 64, 64), torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        expected, out = ref(rgb, depth.repeat(1, 3, 1, 1)), ours({"rgb": rgb, "depth": depth})["out"]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_other_class_count_keeps_all_but_the_classifier(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ref, path = official_checkpoint(tmp_path, "mit_b0", num_classes=40, seed=3)
    with caplog.at_level("INFO", logger="segplat.models.convert.cmx"):
        ours = CMX({"rgb": 3, "hha": 3}, 9, backbone="mit_b0", pretrained=str(path))
    assert ours.load_report["skipped"] == ["head.1.weight", "head.1.bias"]
    lines = [r.getMessage() for r in caplog.records if "classifier" in r.getMessage()]
    assert len(lines) == 1 and "40 classes" in lines[0] and "predicts 9" in lines[0]
    torch.testing.assert_close(ours.decoder.fuse[0].bias, ref.decode_head.linear_fuse[0].bias)
    torch.testing.assert_close(ours.fusion["ffm"]["3"].channel_emb.norm.running_mean,
                               ref.backbone.FFMs[3].channel_emb.norm.running_mean)


def test_module_prefix_of_a_ddp_save_is_dropped(tmp_path: Path) -> None:
    ref = randomised(OfficialCMX("mit_b0", 5), 4)
    torch.save({"model": {f"module.{k}": v for k, v in ref.state_dict().items()}}, tmp_path / "ddp.pth")
    ours = CMX({"rgb": 3, "hha": 3}, 5, backbone="mit_b0", pretrained=str(tmp_path / "ddp.pth"))
    torch.testing.assert_close(ours.encoders[1].stages[2].blocks[1].attn.kv.weight,
                               ref.backbone.extra_block3[1].attn.kv.weight)


@pytest.mark.parametrize("kwargs, words", [
    ({"backbone": "mit_b2"}, r"is a CMX mit_b0 but model\.backbone=mit_b2; set model\.backbone=mit_b0"),
    ({"fusion": {"level": "mid", "type": "frm_ffm", "stages": [2, 3]}}, r"set fusion\.stages=null"),
    ({"decoder_embed_dim": 256}, r"set model\.decoder_embed_dim=512"),
])
def test_what_does_not_fit_is_refused_naming_the_key(kwargs: dict, words: str, tmp_path: Path) -> None:
    _ref, path = official_checkpoint(tmp_path, "mit_b0", seed=5)
    # the checks run before any tensor is copied, so the model can live on the meta device
    with torch.device("meta"), pytest.raises(CheckpointError, match=words):
        CMX({"rgb": 3, "hha": 3}, 5, **{"backbone": "mit_b0", **kwargs}, pretrained=str(path))


def test_segformer_checkpoints_still_start_both_streams(tmp_path: Path) -> None:
    """A file without an X stream is not an official CMX model: both streams load it as a SegFormer encoder."""
    ref, _ = official_checkpoint(tmp_path, "mit_b0", seed=6)
    rgb_only = {k: v for k, v in ref.state_dict().items()
                if k.startswith(("backbone.patch_embed", "backbone.block", "backbone.norm"))}
    torch.save({"state_dict": rgb_only}, tmp_path / "segformer.pth")
    ours = CMX({"rgb": 3, "hha": 3}, 5, backbone="mit_b0", pretrained=str(tmp_path / "segformer.pth"))
    assert ours.load_report is None
    for encoder in ours.encoders:
        torch.testing.assert_close(encoder.stages[0].blocks[0].attn.q.weight, ref.backbone.block1[0].attn.q.weight)
