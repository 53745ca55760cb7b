"""What a built model fuses, read from its modules, and what its config says it should fuse, read from YAML.

The two sides are computed independently on purpose: `built_fusion` looks only at the model's modules,
`named_fusion` only at the composed config and the conf/fusion files, so a config key that the model
ignores shows up as a difference.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from torch import nn

from segplat.models.cmx import CMX
from segplat.models.dualstream import DualStream
from segplat.models.ms2mnet import MS2MNet
from segplat.models.unet3d import UNet3D
from tests.conftest import CONF_DIR

MODEL_PRESETS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
FUSION_OPTIONS = sorted(p.stem for p in (CONF_DIR / "fusion").glob("*.yaml"))

# per preset: overrides for a tiny build, and the modalities (name -> channels) it is built for
TINY: dict[str, tuple[list[str], dict[str, int]]] = {
    "unet": (["model.encoder.name=resnet10t", "model.decoder.channels=[16,16,16,16]"], {"rgb": 3, "nir": 1}),
    "deeplabv3plus": (["model.encoder.name=resnet10t", "model.decoder.channels=16",
                       "model.decoder.low_level_channels=8"], {"rgb": 3, "nir": 1}),
    "segformer": (["model.backbone=mit_b0", "model.decoder_embed_dim=32"], {"rgb": 3, "nir": 1}),
    "cmx": (["model.backbone=mit_b0", "model.decoder_embed_dim=32"], {"rgb": 3, "nir": 1}),
    "dualstream": (["model.vision_encoder._target_=segplat.models.encoders.mit.mit_b0", "model.air.dims=[16,16,32,32]",
                    "model.air.depths=[1,1,1,1]", "model.decoder.channels=[32,16,16]",
                    "model.decoder.aspp_channels=32"], {"image": 4, "air": 6}),
    "unet3d": (["model.widths=[8,16,16]", "model.heads=2"], {"s2": 4, "s1": 2}),
    # geo-foundation models (the gfm extra): band names are part of the build; Prithvi has no SAR bands, so its
    # S1 stream learns VV/VH as new channels and zero-fills the optical ones (the Sen1Floods11 sweep's setting)
    "prithvi": (["model.encoder.name=prithvi_eo_v2_tiny_tl", "model.decoder.channels=[16,16,16]",
                 "model.encoder.missing_bands=zero", "model.encoder.extra_bands=learn"], {"s2": 6, "s1": 2}),
    "terramind": (["model.encoder.name=terramind_v1_tiny", "model.decoder.channels=[16,16,16]"],
                  {"s2": 13, "s1": 2}),
    "ms2mnet": (["model.backbone=resnet10t", "model.decode_channels=32", "model.state_dims=[4,4,4,4]",
                 "model.vfe_mlp_ratio=1.0"],
                {"image": 3, "dsm": 1}),
}


_S2_6 = ["B02", "B03", "B04", "B8A", "B11", "B12"]
BANDS: dict[str, dict[str, list[str]]] = {
    "prithvi": {"s2": _S2_6, "s1": ["VV", "VH"]},
    "terramind": {"s2": ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"],
                  "s1": ["VV", "VH"]},
}
GFM_PRESETS = frozenset(BANDS)


def tiny_build(cfg: DictConfig, preset: str) -> nn.Module:
    """Build as the train task does (band names passed to the models that take them)."""
    from segplat.models.build import build_model

    modalities = TINY[preset][1]
    bands = {m: BANDS[preset][m] for m in modalities} if preset in BANDS else None
    return build_model(cfg.model, modalities, 3, bands)


def tiny_overrides(preset: str) -> list[str]:
    overrides, modalities = TINY[preset]
    return [f"model={preset}", *overrides, f"dataset.modalities=[{','.join(modalities)}]"]


def _name(module: nn.Module) -> str:
    return type(module).__name__


def built_fusion(model: nn.Module) -> dict[str, str]:
    """Where the built model fuses streams -> the fusion module's class name; {} for one stream."""
    if isinstance(model, MS2MNet):  # the release's names: waseFusion1..4, one per ResNet stage
        return {str(i): _name(getattr(model, f"waseFusion{i + 1}")) for i in range(4)
                if hasattr(model, f"waseFusion{i + 1}")}
    fusion = getattr(model, "fusion", None)
    if fusion is None:
        return {}
    if isinstance(model, CMX):  # an FRM and an FFM per fused stage
        return {**{f"frm{k}": _name(m) for k, m in fusion["frm"].items()},
                **{f"ffm{k}": _name(m) for k, m in fusion["ffm"].items()}}
    return {k: _name(m) for k, m in fusion.items()}


def _class_name(target: str) -> str:
    return target.rsplit(".", 1)[-1]


def _type_modules() -> dict[str, str]:
    """fusion type -> the class name its conf/fusion entries build, read from the YAML files."""
    found = {}
    for path in sorted((CONF_DIR / "fusion").glob("*.yaml")):
        node = OmegaConf.load(path)
        if node.module is not None:
            found[node.type] = _class_name(node.module._target_)
    return found


def named_fusion(cfg: DictConfig, model: nn.Module, pyramid_depth: int) -> dict[str, str]:
    """What `built_fusion` must return for the composed config `cfg` (fusion group + model keys)."""
    f = OmegaConf.to_container(cfg.fusion, resolve=True)
    stages = list(range(pyramid_depth)) if f["stages"] is None else sorted(set(f["stages"]))
    if f["level"] == "early":
        return {}
    decoder = str(OmegaConf.select(cfg, "model.decoder._target_", default=""))
    if f["level"] == "mid" and f["stages"] is None and decoder.endswith("DeepLabV3PlusDecoder"):
        # it reads two levels (the low-level one and the last): only those are fused
        reductions = list(next(iter(model.encoders.values())).reductions)
        stages = [reductions.index(cfg.model.decoder.low_level_stride), pyramid_depth - 1]
    if isinstance(model, CMX):
        return {**{f"frm{s}": "FeatureRectifyModule" for s in stages},
                **{f"ffm{s}": "FeatureFusionModule" for s in stages}}
    if isinstance(model, DualStream):
        film = set(cfg.model.film_stages)
        return {str(s): "FiLMGateFusion" if s in film else "CrossAttentionFusion" for s in stages}
    if isinstance(model, MS2MNet):
        return {str(s): "WASEFusion" for s in stages}
    module = _class_name(f["module"]["_target_"]) if f.get("module") else _type_modules()[f["type"]]
    if f["level"] == "late":
        return {"final": module}
    expected = {str(s): module for s in stages}
    if isinstance(model, UNet3D) and cfg.model.get("cross_attention") is not False:
        attn = cfg.model.attn_levels if cfg.model.attn_levels is not None else range(1, len(cfg.model.widths))
        expected.update({f"x{i}_{m}": "TemporalCrossAttention" for i in attn if i in stages for m in model.modalities})
    return expected


def stream_encoders(model: nn.Module) -> int:
    """How many encoders the built model runs (one for early fusion, one per stream otherwise)."""
    if isinstance(model, MS2MNet):
        return 2  # rgb_backbone and dsm_backbone, as released
    encoders = getattr(model, "encoders", None)
    return 1 if encoders is None else len(encoders)


def pyramid_depth(model: nn.Module) -> int:
    """The number of stages of the built model's (first) encoder."""
    if isinstance(model, MS2MNet):
        return len(model.rgb_backbone.out_channels) if hasattr(model.rgb_backbone, "out_channels") else 4
    encoders = getattr(model, "encoders", None)
    first = model.encoder if encoders is None else next(iter(encoders.values() if hasattr(encoders, "values")
                                                              else encoders))
    return len(first.widths if hasattr(first, "widths") else first.out_channels)
