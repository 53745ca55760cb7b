"""The parts of the GFM encoders that need no TerraTorch: band mapping, the ViT pyramid neck, where weights come
from, how the Segmenter hands band names to encoders, and the sentence when the `gfm` extra is missing."""

from __future__ import annotations

import functools
import logging
import math
import sys
from typing import ClassVar

import pytest
import torch
from torch import nn

from segplat.errors import ConfigError
from segplat.models import Segmenter
from segplat.models.build import build_model
from segplat.models.decoders import UNetDecoder
from segplat.models.encoders import TimmEncoder
from segplat.models.encoders.gfm.bands import canonical_band, map_bands, stacked_bands
from segplat.models.encoders.gfm.neck import ViTPyramidNeck, default_out_indices
from segplat.models.encoders.gfm.weights import resolve_weights
from segplat.schema import check_targets
from tests.models.base_tester import refusal

S2 = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"]
HLS = ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"]
LOG = "segplat.models.encoders.gfm.bands"


def stack(**modalities: list[str]) -> list[tuple[int, str, str]]:
    return stacked_bands(modalities, sum(len(b) for b in modalities.values()), "test GFM")


# -- band mapping -------------------------------------------------------------------------------------------------
def test_sentinel2_band_ids_map_to_the_pretrained_names():
    assert [canonical_band(b) for b in S2] == [
        "COASTAL_AEROSOL", "BLUE", "GREEN", "RED", "RED_EDGE_1", "RED_EDGE_2", "RED_EDGE_3", "NIR_BROAD",
        "NIR_NARROW", "WATER_VAPOR", "CIRRUS", "SWIR_1", "SWIR_2"]
    assert canonical_band("B02") == "BLUE" and canonical_band("b8a") == "NIR_NARROW"
    assert canonical_band("nir") == "NIR"  # ambiguous: never guessed
    assert canonical_band("nir", {"nir": "nir_narrow"}) == "NIR_NARROW"


def test_exact_mapping_picks_each_pretrained_band_from_its_channel_in_any_order():
    shuffled = ["B12", "B3", "B8A", "B2", "B11", "B4"]
    m = map_bands("Prithvi", "image", HLS, stack(s2=shuffled))
    assert m.sources == (3, 1, 5, 2, 4, 0)
    assert m.bands == tuple(HLS) and not m.zero_filled and not m.learned


def test_missing_band_is_refused_naming_it_and_zero_filled_on_request(caplog):
    no_b12 = [b for b in S2 if b != "B12"]
    with pytest.raises(ConfigError, match=r"no band for SWIR_2 \(B12\).*missing_bands=zero") as err:
        map_bands("Prithvi", "image", HLS, stack(s2=no_b12))
    assert "\n" not in str(err.value)
    with caplog.at_level(logging.INFO, logger=LOG):
        m = map_bands("Prithvi", "image", HLS, stack(s2=no_b12), missing_bands="zero")
    assert m.sources[-1] == -1 and m.zero_filled == ("SWIR_2",)
    assert any("zeros for SWIR_2" in r.getMessage() for r in caplog.records)


def test_extra_bands_are_dropped_with_one_log_line_or_learned(caplog):
    with caplog.at_level(logging.INFO, logger=LOG):
        m = map_bands("Prithvi", "image", HLS, stack(s2=S2, s1=["VV", "VH"]))
    drops = [r.getMessage() for r in caplog.records if "drops" in r.getMessage()]
    assert len(drops) == 1 and "s2.B1" in drops[0] and "s1.VH" in drops[0] and "s2.B2," not in drops[0]
    assert len(m.sources) == 6
    learned = map_bands("Prithvi", "image", HLS, stack(s2=S2, s1=["VV", "VH"]), extra_bands="learn")
    assert learned.sources[6:] == (0, 4, 5, 6, 7, 9, 10, 13, 14) and learned.learned[-2:] == ("s1.VV", "s1.VH")
    some = map_bands("Prithvi", "image", HLS, stack(s2=S2, s1=["VV", "VH"]), extra_bands=["VV", "VH"])
    assert some.sources[6:] == (13, 14) and some.bands[6:] == ("s1.VV", "s1.VH")


def test_two_dataset_bands_for_one_pretrained_band_are_refused():
    with pytest.raises(ConfigError, match=r"\(s2.B4 and rgb.red to RED; s2.B3 and rgb.green to GREEN; s2.B2 and "
                                          r"rgb.blue to BLUE\)"):
        map_bands("Prithvi", "image", HLS, stack(s2=S2, rgb=["red", "green", "blue"]))


def gfm_refusal(**keys) -> str:
    """The walker's refusal of a `model.encoder` Prithvi node with `keys` (no TerraTorch needed)."""
    encoder = {"_target_": "segplat.models.encoders.gfm.PrithviEncoder", "_partial_": True, **keys}
    return refusal(Segmenter, {"encoder": encoder})


def test_policies_and_band_counts_are_checked():
    assert gfm_refusal(missing_bands="ignore") == ("model.encoder.missing_bands=ignore is not known; use error or "
                                                   "zero; a pretrained band the dataset lacks: refuse, or feed zeros.")
    assert gfm_refusal(extra_bands="keep").startswith("model.encoder.extra_bands=keep must be one of drop, learn or a "
                                                      "list of strings; a dataset band the model was not pretrained on")
    check_targets({"model": {"_target_": "segplat.models.Segmenter", "encoder": {
        "_target_": "segplat.models.encoders.gfm.PrithviEncoder", "_partial_": True, "extra_bands": ["VV", "VH"],
        "neck_channels": 64, "strides": [4, 8, 16, 32]}}})
    with pytest.raises(ConfigError, match="got 3 input channels but the band names list 2"):
        stacked_bands({"s1": ["VV", "VH"]}, 3, "X")
    with pytest.raises(ConfigError, match="needs the dataset's band names"):
        stacked_bands(None, 3, "X")


# -- the neck ----------------------------------------------------------------------------------------------------
def test_default_out_indices_spread_over_the_depth():
    assert default_out_indices(12, 4) == [2, 5, 8, 11]
    assert default_out_indices(24, 4) == [5, 11, 17, 23]


@pytest.mark.parametrize("kind", ["learned", "interpolate"])
@pytest.mark.parametrize("patch, size", [(16, (64, 64)), (16, (40, 56)), (14, (70, 42))])
def test_neck_gives_exact_strides_for_any_input_and_patch_size(kind, patch, size):
    neck = ViTPyramidNeck(32, patch, (4, 8, 16, 32), kind, channels=None if kind == "learned" else 24)
    padded = tuple(math.ceil(s / patch) * patch for s in size)
    grid = (padded[0] // patch, padded[1] // patch)
    maps = [torch.randn(2, 32, *grid) for _ in range(4)]
    out = neck(maps, size, padded)
    assert [tuple(o.shape[-2:]) for o in out] == [(math.ceil(size[0] / s), math.ceil(size[1] / s))
                                                  for s in (4, 8, 16, 32)]
    assert [o.shape[1] for o in out] == neck.out_channels
    assert neck.out_channels == ([8, 16, 32, 32] if kind == "learned" else [24] * 4)


def test_neck_crops_the_padding_instead_of_squeezing_it():
    neck = ViTPyramidNeck(4, 16, (16,), "interpolate")
    grid = torch.zeros(1, 4, 3, 3)
    grid[..., :2, :2] = 1.0  # the valid 32x32 of a 48x48 padded input
    out = neck([grid], (32, 32), (48, 48))[0]
    assert out.shape[-2:] == (2, 2) and torch.all(out == 1.0)


def test_neck_refuses_bad_settings():
    assert gfm_refusal(neck="upernet") == ("model.encoder.neck=upernet is not known; use learned or interpolate; "
                                           "learned: ViTDet's simple feature pyramid; interpolate: bilinear only.")
    assert gfm_refusal(strides=[4, 0]).startswith("model.encoder.strides=[4,0] must be a non-empty list of positive "
                                                  "integers")
    assert gfm_refusal(merge="mean").startswith("model.encoder.merge is not a key of model.encoder")  # TerraMind's
    with pytest.raises(ConfigError, match=r"strides=.*increasing"):
        ViTPyramidNeck(8, 16, (8, 4), "learned")
    with pytest.raises(ConfigError, match="one width per level"):
        ViTPyramidNeck(8, 16, (4, 8), "learned", channels=[8, 8, 8])


# -- weights --------------------------------------------------------------------------------------------------------
REPO, FILE = "ibm-nasa-geospatial/Prithvi-EO-2.0-300M", "Prithvi_EO_V2_300M.pt"


def hf_tree(root, repo=REPO, file=FILE):
    """A Hugging Face hub cache entry as `hf download` writes it (refs/main -> snapshots/<rev>/FILE)."""
    entry = root / f"models--{repo.replace('/', '--')}"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text("0123abcd")
    snap = entry / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (snap / file).write_bytes(b"weights")
    return snap / file


def test_weights_from_a_file_a_folder_or_a_cache_tree(tmp_path):
    assert resolve_weights(None, REPO, FILE) is None
    file = tmp_path / "w.pt"
    file.write_bytes(b"x")
    assert resolve_weights(str(file), REPO, FILE) == file
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / FILE).write_bytes(b"x")
    assert resolve_weights(str(flat), REPO, FILE) == flat / FILE
    pytest.importorskip("huggingface_hub")
    cache = tmp_path / "hub"
    expected = hf_tree(cache)
    assert resolve_weights(str(cache), REPO, FILE) == expected


def test_weights_from_the_users_hugging_face_cache_and_its_absence(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match=f"{FILE} of {REPO} is not in the Hugging Face cache; .*hf download"):
        resolve_weights("hf", REPO, FILE)
    expected = hf_tree(tmp_path)
    assert resolve_weights("hf", REPO, FILE) == expected


def test_missing_weights_are_refused_in_one_sentence(tmp_path):
    with pytest.raises(ConfigError, match=r"pretrained=.*nope\.pt is neither a file nor a folder"):
        resolve_weights(str(tmp_path / "nope.pt"), REPO, FILE)
    with pytest.raises(ConfigError, match=f"is a folder without {FILE} of {REPO}"):
        resolve_weights(str(tmp_path), REPO, FILE)


# -- the Segmenter's side ----------------------------------------------------------------------------------------------
class BandAwareEncoder(nn.Module):
    """A stand-in GFM: declares `bands`, records them, and keeps a randomly initialised `neck`."""

    head_modules = ("neck",)
    seen: ClassVar[list] = []

    def __init__(self, in_chans: int, bands=None) -> None:
        super().__init__()
        BandAwareEncoder.seen.append(None if bands is None else {k: list(v) for k, v in bands.items()})
        self.stem = nn.Conv2d(in_chans, 8, 3, stride=4, padding=1)
        self.neck = nn.Conv2d(8, 8, 1)
        self.out_channels, self.reductions = [8, 8], [4, 8]

    def forward(self, x):
        a = self.neck(self.stem(x))
        return [a, nn.functional.avg_pool2d(a, 2)]


def test_segmenter_passes_band_names_only_to_encoders_that_take_them():
    BandAwareEncoder.seen.clear()
    bands = {"s2": ["B2", "B3"], "s1": ["VV"]}
    dec = functools.partial(UNetDecoder, channels=(8,))
    Segmenter({"s2": 2, "s1": 1}, 2, BandAwareEncoder, dec, {"level": "early"}, bands=bands)
    Segmenter({"s2": 2, "s1": 1}, 2, BandAwareEncoder, dec, {"level": "mid"}, bands=bands)
    assert BandAwareEncoder.seen == [bands, {"s2": ["B2", "B3"]}, {"s1": ["VV"]}]
    # a timm encoder never sees the keyword
    Segmenter({"s2": 2, "s1": 1}, 2, functools.partial(TimmEncoder, name="resnet10t"), dec, bands=bands)


def test_an_encoders_head_modules_train_with_the_decoder():
    model = Segmenter({"s2": 2}, 2, BandAwareEncoder, functools.partial(UNetDecoder, channels=(8,)),
                      bands={"s2": ["B2", "B3"]})
    groups = {g: {n for n, _ in ps} for g, ps in model.grouped_parameters().items()}
    assert "encoders.stack.stem.weight" in groups["encoder"]
    assert {"encoders.stack.neck.weight", "encoders.stack.neck.bias"} <= groups["decoder"]


def test_build_model_adds_bands_only_for_models_that_take_them():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"_target_": "segplat.models.Segmenter",
                            "encoder": {"_target_": "tests.models.test_gfm_parts.BandAwareEncoder",
                                        "_partial_": True},
                            "decoder": {"_target_": "segplat.models.decoders.UNetDecoder", "_partial_": True,
                                        "channels": [8]}})
    BandAwareEncoder.seen.clear()
    build_model(cfg, {"s2": 2}, 2, {"s2": ("B2", "B3"), "unused": ("x",)})
    assert BandAwareEncoder.seen == [{"s2": ["B2", "B3"]}]
    seg = OmegaConf.create({"_target_": "segplat.models.segformer.SegFormer", "backbone": "mit_b0",
                            "decoder_embed_dim": 32})
    build_model(seg, {"rgb": 3}, 2, {"rgb": ("red", "green", "blue")})  # SegFormer takes no bands: not passed


def test_missing_extra_is_one_sentence_naming_the_install(monkeypatch):
    from segplat.models.encoders.gfm import PrithviEncoder

    monkeypatch.setitem(sys.modules, "terratorch.registry", None)  # what an environment without the extra sees
    with pytest.raises(ConfigError, match=r'need TerraTorch, which is not installed .*pip install -e "\.\[gfm\]"'):
        PrithviEncoder(in_chans=6, bands={"s2": ["B2", "B3", "B4", "B8A", "B11", "B12"]})
