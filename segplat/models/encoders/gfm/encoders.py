"""Prithvi-EO and TerraMind as pyramid encoders of the generic Segmenter, built through TerraTorch's registry.

TerraTorch (the optional `gfm` extra: `pip install -e ".[gfm]"`) supplies the model code only: the ViT is
built with `BACKBONE_REGISTRY.build("terratorch_<name>", pretrained=False, ...)`; segplat does the rest
so that nothing is silently wrong:
- the dataset's band names are mapped onto the bands the GFM was pretrained on (`bands.py`);
- pretrained weights come from a local file, a user-filled folder or the Hugging Face cache (`weights.py`),
  never a download, and are loaded strictly: every encoder weight must be in the file with its shape;
- the tokens of `out_indices` blocks become a 4-level pyramid (`neck.py`) at strides 4/8/16/32, the shape
  CNN decoders expect; the neck starts from random and is grouped with the decoder (`head_modules`), so
  freezing the encoder (`callbacks=finetune`) or `optimizer.encoder_lr` touch the pretrained ViT only.

Inputs are segplat's standardised bands (the store's per-band mean/std), the same z-scored form the GFMs
were pretrained on, with the dataset's own statistics. Inputs are zero-padded to a multiple of the patch
size and the pyramid is cropped back, so any input size works.
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, ClassVar, Literal

import torch
from torch import nn
from torch.nn import functional as F

from segplat.errors import CheckpointError, ConfigError
from segplat.models.encoders.gfm.bands import ExtraBands, InputMapping, MissingBands, map_bands, stacked_bands
from segplat.models.encoders.gfm.neck import NeckChannels, NeckKind, Strides, ViTPyramidNeck, default_out_indices
from segplat.models.encoders.gfm.weights import resolve_weights
from segplat.models.weights import load_state_file
from segplat.schema import Hint, OpenFraction

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install -e ".[gfm]"'

# the keys both GFM encoders take
Pretrained = Annotated[str | None, Hint("a local file or folder, or hf for the Hugging Face cache; null = random")]
OutIndices = Annotated[Sequence[int] | None, Hint("the ViT blocks of the pyramid levels; null = evenly spaced")]
BandMap = Annotated[Mapping[str, str] | None, Hint("dataset band name -> pretrained band name")]
TERRAMIND_REGISTER = "terratorch.models.backbones.terramind.model.terramind_register"


def _fp32_switches() -> dict[str, Any]:
    b = torch.backends
    return {"mkldnn.matmul": b.mkldnn.matmul, "mkldnn.conv": b.mkldnn.conv, "cuda.matmul": b.cuda.matmul,
            "cudnn.conv": b.cudnn.conv}


def import_terratorch(module: str = "terratorch.registry") -> ModuleType:
    """Import a TerraTorch module, or one sentence saying how to install the extra; the process is left as it was.

    Importing TerraTorch 1.2 changes process-wide state: it runs `torch.set_float32_matmul_precision("medium")` (in
    its clay_v15 backbone: from then on every float32 matmul runs in bf16 on CPU and TF32 on CUDA, 1e-4 relative
    errors where fp32 gives 1e-7), sets `TORCH_CUDNN_V8_API_DISABLED=1` (inherited by every worker and child),
    and adds warning filters that hide, among others, rasterio's NotGeoreferencedWarning and the LR scheduler's
    warnings. The precision switches, the environment and the warning filters are put back."""
    try:
        with terratorch_leaves_the_process_as_it_was():
            return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(f"model.encoder: the geo-foundation-model encoders need TerraTorch, which is not installed "
                          f"({err}); install the extra with {INSTALL_HINT}.") from err


@contextmanager
def terratorch_leaves_the_process_as_it_was() -> Iterator[None]:
    """Anything that may import a TerraTorch module (an import, and the registry's lookups and builds, which import
    backbone modules lazily): fp32 precision switches, environment and warning filters are put back after it."""
    switches = _fp32_switches()
    saved = torch.get_float32_matmul_precision(), {k: s.fp32_precision for k, s in switches.items()}
    environ = dict(os.environ)
    try:
        with warnings.catch_warnings():  # restores the filters on exit
            yield
    finally:
        if (torch.get_float32_matmul_precision(), {k: s.fp32_precision for k, s in switches.items()}) != saved:
            torch.set_float32_matmul_precision(saved[0])
            for key, switch in switches.items():
                switch.fp32_precision = saved[1][key]
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        os.environ.update({k: v for k, v in environ.items() if os.environ.get(k) != v})


def terratorch_registry() -> Any:
    """TerraTorch's backbone registry, or one sentence saying how to install the extra."""
    return import_terratorch().BACKBONE_REGISTRY


def _few(keys: Sequence[str], n: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def load_exact(module: nn.Module, state: Mapping[str, torch.Tensor], source: Path, what: str) -> None:
    """Load `state` into `module` only if it holds every weight of the module, with the module's shapes."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = [f"lacks {_few(missing)}" if missing else "", f"has unknown {_few(unexpected)}" if unexpected else "",
                 f"has other shapes for {_few(wrong, 3)}" if wrong else ""]
        raise CheckpointError(f"model.encoder.pretrained={source} is not a {what} checkpoint: it "
                              f"{'; '.join(p for p in parts if p)}; use the file published for this model size.")
    module.load_state_dict(dict(state), strict=True)


class GFMEncoder(nn.Module):
    """A ViT geo-foundation model as a pyramid encoder: band mapping, padding, token reshaping, neck.

    Subclasses say which inputs the GFM has (`map_inputs`), build it (`build_backbone`), load a checkpoint
    (`load_weights`) and run it (`run_backbone` -> every block's tokens (B, N, D)).
    """

    family: ClassVar[str] = "GFM"
    #: submodules that start from random and train with the decoder (Segmenter.param_group reads this)
    head_modules: ClassVar[tuple[str, ...]] = ("neck",)
    # the neck makes each level from the ViT's tokens side by side (not each from the one before), so a level of
    # a second stream that is not fused is never used
    parallel_levels: ClassVar[bool] = True

    @classmethod
    def pyramid_depth(cls, config: Mapping[str, Any]) -> int:
        """The pyramid's depth from the config alone (one level per neck stride), for checks before any data."""
        return len(list(config.get("strides") or (4, 8, 16, 32)))

    def __init__(self, in_chans: int, bands: Mapping[str, Sequence[str]] | None, name: str,
                 pretrained: str | None = None, out_indices: OutIndices = None, neck: NeckKind = "learned",
                 strides: Strides = (4, 8, 16, 32), neck_channels: NeckChannels = None,
                 band_map: BandMap = None, missing_bands: MissingBands = "error",
                 extra_bands: ExtraBands = "drop", drop_path_rate: OpenFraction = 0.0) -> None:
        super().__init__()
        self.name = str(name)
        registry = terratorch_registry()
        with terratorch_leaves_the_process_as_it_was():
            self.check_name(registry)
        stacked = stacked_bands(bands, in_chans, f"{self.family} {self.name}")
        band_map = dict(band_map or {})
        self.mappings = self.map_inputs(stacked, band_map, missing_bands, extra_bands)
        empty = [m.name for m in self.mappings if all(src < 0 for src in m.sources)]
        if empty:
            raise ConfigError(f"model.encoder: no dataset band reaches {self.family} {self.name}'s {', '.join(empty)} "
                              "input (every band would be zeros); map bands with model.encoder.band_map or learn the "
                              "dataset's bands with model.encoder.extra_bands=learn.")
        self.in_chans = int(in_chans)
        with terratorch_leaves_the_process_as_it_was():
            self.backbone = self.build_backbone(registry, float(drop_path_rate))
        weights = resolve_weights(pretrained, *self.published_weights())
        if weights is not None:
            self.load_weights(weights)
            log.info("model.encoder: loaded %s %s from %s", self.family, self.name, weights)
        self.extend_patch_embeddings()
        self.out_indices = self._block_indices(out_indices, strides)
        self.neck = ViTPyramidNeck(self.embed_dim, self.patch_size, strides, neck, neck_channels)
        self.out_channels: list[int] = list(self.neck.out_channels)
        self.reductions: list[int] = list(self.neck.strides)
        for i, m in enumerate(self.mappings):  # channel index per GFM input; in_chans = the zero channel
            self.register_buffer(f"_sources_{i}", torch.tensor([s if s >= 0 else in_chans for s in m.sources],
                                                                dtype=torch.long), persistent=False)
        self.needs_zeros = any(s < 0 for m in self.mappings for s in m.sources)

    def _block_indices(self, out_indices: Sequence[int] | None, strides: Sequence[int]) -> list[int]:
        """The ViT blocks whose tokens make the pyramid levels: one per level of `strides`, blocks of this model."""
        depth, levels = self.depth, len(list(strides))
        indices = list(out_indices) if out_indices is not None else default_out_indices(depth, levels)
        if len(indices) != levels or any(not -depth <= int(i) < depth for i in indices):
            raise ConfigError(f"model.encoder.out_indices={list(indices)} must name {levels} blocks (one per level of "
                              f"strides={list(strides)}) of the {depth} that {self.family} {self.name} has.")
        return [int(i) % depth for i in indices]

    # -- what subclasses provide ----------------------------------------------------------------------
    def check_name(self, registry: Any) -> None:
        raise NotImplementedError

    def map_inputs(self, stacked: list[tuple[int, str, str]], band_map: dict[str, str], missing_bands: str,
                   extra_bands: str | Sequence[str]) -> list[InputMapping]:
        raise NotImplementedError

    def build_backbone(self, registry: Any, drop_path_rate: float) -> nn.Module:
        raise NotImplementedError

    def published_weights(self) -> tuple[str | None, str | None]:
        """(Hugging Face repository, file name) of the official weights, for the cache look-up."""
        return None, None

    def load_weights(self, path: Path) -> None:
        raise NotImplementedError

    def extend_patch_embeddings(self) -> None:
        """Give learned extra bands their (randomly initialised) patch-embedding channels; default: built in."""

    def run_backbone(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    depth: int
    embed_dim: int
    patch_size: int

    # -- shared -----------------------------------------------------------------------------------------
    @property
    def input_bands(self) -> dict[str, tuple[str, ...]]:
        """GFM input -> the band names of its channels (pretrained order, then learned extras)."""
        return {m.name: m.bands for m in self.mappings}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.ndim != 4:
            raise ConfigError(f"{self.family} encoders take single-date (B, C, H, W) inputs, got shape "
                              f"{tuple(x.shape)}; use a temporal model for time series.")
        h, w = x.shape[-2:]
        p = self.patch_size
        pad_h, pad_w = (-h) % p, (-w) % p
        if pad_h or pad_w:  # zero = the band mean after standardisation; cropped off again in the neck
            x = F.pad(x, (0, pad_w, 0, pad_h))
        if self.needs_zeros:
            x = torch.cat([x, x.new_zeros(x.shape[0], 1, *x.shape[-2:])], dim=1)
        inputs = {m.name: x.index_select(1, getattr(self, f"_sources_{i}")) for i, m in enumerate(self.mappings)
                  if m.sources}
        tokens = self.run_backbone(inputs)
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        maps = [self.tokens_to_map(tokens[i], grid) for i in self.out_indices]
        return self.neck(maps, (h, w), (x.shape[-2], x.shape[-1]))

    @staticmethod
    def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, N, D) with N = extra (class/register) tokens + grid tokens -> (B, D, gh, gw)."""
        b, n, d = tokens.shape
        extra = n - grid[0] * grid[1]
        if extra < 0:
            raise RuntimeError(f"the backbone returned {n} tokens for a {grid[0]}x{grid[1]} patch grid")
        return tokens[:, extra:].transpose(1, 2).reshape(b, d, *grid)


# -- Prithvi-EO -------------------------------------------------------------------------------------------
class PrithviEncoder(GFMEncoder):
    """Prithvi-EO (v1 / v2; `name`: prithvi_eo_v2_300, prithvi_eo_v2_600, prithvi_eo_v2_100_tl, ..._tl,
    prithvi_eo_v2_tiny_tl, prithvi_eo_tiny, prithvi_eo_v1_100): one image input pretrained on the six HLS
    bands BLUE, GREEN, RED, NIR_NARROW, SWIR_1, SWIR_2 (Sentinel-2 B2 B3 B4 B8A B11 B12); single date.
    All dataset modalities' bands are pooled into that one input (early fusion); a mid-fusion stream gets
    its own Prithvi. `extra_bands=learn` (or a list such as [VV, VH]) adds bands it was not trained on as
    new patch-embedding channels."""

    family = "Prithvi"

    def __init__(self, in_chans: int, bands: Mapping[str, Sequence[str]] | None = None,
                 name: Annotated[str, Hint("a Prithvi-EO backbone of TerraTorch")] = "prithvi_eo_v2_300",
                 pretrained: Pretrained = None, out_indices: OutIndices = None, neck: NeckKind = "learned",
                 strides: Strides = (4, 8, 16, 32), neck_channels: NeckChannels = None,
                 band_map: BandMap = None, missing_bands: MissingBands = "error",
                 extra_bands: ExtraBands = "drop", drop_path_rate: OpenFraction = 0.0) -> None:
        super().__init__(in_chans, bands, name, pretrained, out_indices, neck, strides, neck_channels, band_map,
                         missing_bands, extra_bands, drop_path_rate)

    @staticmethod
    def variants() -> dict[str, Any]:
        prithvi_cfgs = import_terratorch("terratorch.models.backbones.prithvi_vit").prithvi_cfgs

        return prithvi_cfgs

    def check_name(self, registry: Any) -> None:
        names = [n for n in self.variants() if f"terratorch_{n}" in registry]
        if self.name not in names:
            raise ConfigError(f"model.encoder.name={self.name!r} is not a Prithvi-EO backbone of TerraTorch; choose "
                              f"one of {', '.join(names)}.")

    def map_inputs(self, stacked, band_map, missing_bands, extra_bands) -> list[InputMapping]:
        pretrained = [getattr(b, "value", b) for b in self.variants()[self.name]["bands"]]
        return [map_bands(f"Prithvi {self.name}", "image", pretrained, stacked, band_map, missing_bands,
                          extra_bands)]

    def build_backbone(self, registry: Any, drop_path_rate: float) -> nn.Module:
        mapping = self.mappings[0]
        # segplat feeds no acquisition dates or coordinates, so the _tl variants are built without their time and
        # location encodings (their weights are skipped on load): parameters that never get a gradient would stall
        # DDP and decay for nothing
        model = registry.build(f"terratorch_{self.name}", pretrained=False, bands=list(mapping.bands), num_frames=1,
                               drop_path=drop_path_rate, coords_encoding=[])
        self.depth = len(model.blocks)
        self.embed_dim = int(model.embed_dim)
        patch = model.patch_embed.patch_size
        if patch[-1] != patch[-2]:
            raise ConfigError(f"model.encoder.name={self.name}: non-square patches {patch} are not supported.")
        self.patch_size = int(patch[-1])
        return model

    def published_weights(self) -> tuple[str | None, str | None]:
        pretrained_weights = import_terratorch("terratorch.models.backbones.prithvi_vit").pretrained_weights

        entry = pretrained_weights.get(self.name) or {}
        return entry.get("hf_hub_id"), entry.get("hf_hub_filename")

    def load_weights(self, path: Path) -> None:
        """A Prithvi MAE (encoder + decoder) or encoder-only checkpoint: the encoder part, exactly."""
        model = self.backbone
        own = model.state_dict()
        state: dict[str, torch.Tensor] = {}
        for key, value in load_state_file(path).items():
            key = key.replace("_timm_module.", "")
            head = key.split(".", 1)[0]
            if key.startswith("encoder."):
                key = key[len("encoder."):]
            elif head.startswith("decoder") or head == "mask_token":
                continue  # the MAE's pixel decoder
            if key not in own and key.startswith(("temporal_embed_enc.", "location_embed_enc.")):
                continue  # a _tl checkpoint in a model without coordinate encodings
            state[key] = value
        if "pos_embed" in own:
            state["pos_embed"] = own["pos_embed"]  # fixed sin-cos table of the model's grid
        proj = "patch_embed.proj.weight"
        n = self.mappings[0].num_pretrained
        if proj in state and proj in own and state[proj].shape[1] == n and own[proj].shape[1] > n:
            weight = own[proj].clone()
            weight[:, :n] = state[proj]
            state[proj] = weight  # learned extra bands keep their fresh channels
        load_exact(model, state, path, f"Prithvi {self.name} ({n} pretrained bands)")

    def run_backbone(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return self.backbone.forward_features(inputs["image"])


# -- TerraMind --------------------------------------------------------------------------------------------
# segplat name -> TerraTorch's raw (untokenised) modality key
TERRAMIND_INPUTS = {"S2L1C": "untok_sen2l1c@224", "S2L2A": "untok_sen2l2a@224", "S1GRD": "untok_sen1grd@224",
                    "S1RTC": "untok_sen1rtc@224", "RGB": "untok_sen2rgb@224", "DEM": "untok_dem@224"}


class TerraMindEncoder(GFMEncoder):
    """TerraMind v1 (`name`: terramind_v1_tiny / _small / _base / _large) on raw inputs: `modality_map`
    sends each dataset modality to one TerraMind input (S2L1C, S2L2A, S1GRD, S1RTC, RGB, DEM) whose
    pretrained bands it must supply. With early fusion one TerraMind sees every modality as its own tokens
    (merged per patch by `merge`: mean, max or concat), the way it was pretrained; a mid-fusion stream gets
    a TerraMind of its own modality."""

    family = "TerraMind"

    def __init__(self, in_chans: int, bands: Mapping[str, Sequence[str]] | None = None,
                 name: Annotated[str, Hint("a TerraMind v1 backbone of TerraTorch")] = "terramind_v1_base",
                 pretrained: Pretrained = None,
                 modality_map: Annotated[Mapping[str, str] | None,
                                         Hint("dataset modality -> TerraMind input (S2L1C, S2L2A, S1GRD, S1RTC, RGB, "
                                              "DEM)")] = None,
                 merge: Annotated[Literal["mean", "max", "concat"],
                                  Hint("how the tokens of several modalities at one patch are merged")] = "mean",
                 out_indices: OutIndices = None, neck: NeckKind = "learned",
                 strides: Strides = (4, 8, 16, 32), neck_channels: NeckChannels = None,
                 band_map: BandMap = None, missing_bands: MissingBands = "error",
                 extra_bands: ExtraBands = "drop", drop_path_rate: OpenFraction = 0.0) -> None:
        self.modality_map = {str(k): str(v).upper() for k, v in (modality_map or {}).items()}
        self.merge = merge
        super().__init__(in_chans, bands, name, pretrained, out_indices, neck, strides, neck_channels, band_map,
                         missing_bands, extra_bands, drop_path_rate)

    def check_name(self, registry: Any) -> None:
        pretrained_weights = import_terratorch(TERRAMIND_REGISTER).pretrained_weights

        names = [n for n in pretrained_weights if n.startswith("terramind_v1_") and f"terratorch_{n}" in registry]
        if self.name not in names:
            raise ConfigError(f"model.encoder.name={self.name!r} is not a TerraMind v1 backbone of TerraTorch; "
                              f"choose one of {', '.join(names)}.")

    def map_inputs(self, stacked, band_map, missing_bands, extra_bands) -> list[InputMapping]:
        PRETRAINED_BANDS = import_terratorch(TERRAMIND_REGISTER).PRETRAINED_BANDS

        modalities = list(dict.fromkeys(m for _, m, _ in stacked))
        unmapped = [m for m in modalities if m not in self.modality_map]
        if unmapped:
            raise ConfigError(f"model.encoder.modality_map has no TerraMind input for dataset modality "
                              f"{', '.join(unmapped)}; map each to one of {', '.join(TERRAMIND_INPUTS)} (e.g. "
                              "modality_map={s2: S2L1C, s1: S1GRD}).")
        targets = [self.modality_map[m] for m in modalities]
        bad = [t for t in targets if t not in TERRAMIND_INPUTS]
        if bad:
            raise ConfigError(f"model.encoder.modality_map names {', '.join(bad)}, which are not TerraMind raw "
                              f"inputs; choose from {', '.join(TERRAMIND_INPUTS)}.")
        twice = sorted({t for t in targets if targets.count(t) > 1})
        if twice:
            raise ConfigError(f"model.encoder.modality_map sends several dataset modalities to {', '.join(twice)}; "
                              "give each TerraMind input one modality.")
        return [map_bands(f"TerraMind {self.name}", target, PRETRAINED_BANDS[TERRAMIND_INPUTS[target]],
                          [s for s in stacked if s[1] == modality], band_map, missing_bands, extra_bands)
                for modality, target in zip(modalities, targets)]

    def build_backbone(self, registry: Any, drop_path_rate: float) -> nn.Module:
        model = registry.build(f"terratorch_{self.name}", pretrained=False, merge_method=self.merge,
                               modalities=[m.name for m in self.mappings], drop_path_rate=drop_path_rate)
        if hasattr(model, "missing_mod_token"):  # concat's stand-in for absent inputs: every input is always fed here
            del model.missing_mod_token
        self.depth = len(model.encoder)
        self.embed_dim = int(model.out_channels[0])
        patches = {tuple(model.encoder_embeddings[model.mod_name_mapping[m.name]].patch_size) for m in self.mappings}
        if len(patches) != 1 or len(next(iter(patches))) != 2 or len(set(next(iter(patches)))) != 1:
            raise ConfigError(f"model.encoder: TerraMind inputs {[m.name for m in self.mappings]} have patch sizes "
                              f"{sorted(patches)}; use inputs with one square patch size.")
        self.patch_size = int(next(iter(patches))[0])
        return model

    def published_weights(self) -> tuple[str | None, str | None]:
        pretrained_weights = import_terratorch(TERRAMIND_REGISTER).pretrained_weights

        entry = pretrained_weights.get(self.name) or {}
        return entry.get("hf_hub_id"), entry.get("hf_hub_filename")

    def load_weights(self, path: Path) -> None:
        """The published checkpoints hold the whole any-to-any model: take exactly this encoder's weights."""
        own = self.backbone.state_dict()
        state = load_state_file(path)
        if not any(k in state for k in own):
            raise CheckpointError(f"model.encoder.pretrained={path} holds no TerraMind weight (e.g. encoder.0.* or "
                                  "encoder_embeddings.*); use the file published for this model size.")
        load_exact(self.backbone, {k: v for k, v in state.items() if k in own or not self._foreign(k)}, path,
                   f"TerraMind {self.name}")

    @staticmethod
    def _foreign(key: str) -> bool:
        """Weights of the any-to-any model that a raw-input encoder does not have (decoder, other inputs)."""
        return key.startswith(("decoder", "encoder_embeddings.", "tokenizer.")) or key == "mask_token"

    def extend_patch_embeddings(self) -> None:
        """New Linear patch projections with the pretrained bands' weights and fresh ones for learned extras."""
        for m in self.mappings:
            if len(m.bands) == m.num_pretrained:
                continue
            embedding = self.backbone.encoder_embeddings[self.backbone.mod_name_mapping[m.name]]
            old = embedding.proj
            pixels = embedding.patch_size[0] * embedding.patch_size[1]
            new = nn.Linear(pixels * len(m.bands), old.out_features, bias=old.bias is not None)
            with torch.no_grad():  # TerraMind's projection reads patches as (pixel, band)
                weight = new.weight.view(old.out_features, pixels, len(m.bands))
                weight[..., : m.num_pretrained] = old.weight.view(old.out_features, pixels, m.num_pretrained)
                if old.bias is not None:
                    new.bias.copy_(old.bias)
            embedding.proj = new
            embedding.num_channels = len(m.bands)

    def run_backbone(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return self.backbone(dict(inputs))
