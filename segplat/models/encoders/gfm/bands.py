"""Band mapping: the bands a dataset stores -> the bands a geo-foundation model was pretrained on.

A GFM's patch embedding has one weight slice per pretrained band, so feeding it a band it was not
trained on in that slot is silently wrong. Here every GFM input declares its pretrained bands by
canonical name (TerraTorch's: BLUE, NIR_NARROW, VV, ...); the dataset's band names (from the store,
e.g. Sentinel-2 `B8A`) are translated to canonical names through `BAND_ALIASES` (plus the user's
`band_map`), and the mapping is either exact or refused / zero-filled / extended by explicit keys:

- a pretrained band the dataset lacks: refused (`missing_bands=error`) or fed as zeros (`zero`: after
  segplat's per-band standardisation, zero is that band's mean);
- a dataset band the GFM was not pretrained on: dropped with one log line (`extra_bands=drop`), or
  appended as a new input channel whose patch-embedding weights start from random (`learn`, or a
  list of the band names to learn, the others dropped).

Pure Python: usable (and tested) without the `gfm` extra.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

from segplat.errors import ConfigError
from segplat.schema import Hint

# the two policies of an inexact mapping (config keys of the GFM encoders)
MissingBands = Annotated[Literal["error", "zero"], Hint("a pretrained band the dataset lacks: refuse, or feed zeros")]
ExtraBands = Annotated[Literal["drop", "learn"] | Sequence[str],
                       Hint("a dataset band the model was not pretrained on: drop it, learn it, or a list of the band "
                            "names to learn")]

log = logging.getLogger(__name__)

# Sentinel-2 band ids (with and without the zero padding some products use) and a few generic names.
# "nir" is deliberately absent: NIR_BROAD (B8) and NIR_NARROW (B8A) are different bands; say which
# with model.encoder.band_map={nir: NIR_NARROW}.
_S2 = {
    "B1": "COASTAL_AEROSOL", "B2": "BLUE", "B3": "GREEN", "B4": "RED", "B5": "RED_EDGE_1", "B6": "RED_EDGE_2",
    "B7": "RED_EDGE_3", "B8": "NIR_BROAD", "B8A": "NIR_NARROW", "B9": "WATER_VAPOR", "B10": "CIRRUS",
    "B11": "SWIR_1", "B12": "SWIR_2",
}
BAND_ALIASES: dict[str, str] = {
    **_S2,
    **{f"B{int(k[1:]):02d}": v for k, v in _S2.items() if k[1:].isdigit()},
    "B08A": "NIR_NARROW",
    "RED": "RED", "GREEN": "GREEN", "BLUE": "BLUE", "COASTAL": "COASTAL_AEROSOL",
    "SWIR1": "SWIR_1", "SWIR2": "SWIR_2", "VV": "VV", "VH": "VH", "DEM": "DEM",
}


_S2_ID = {v: k for k, v in _S2.items()}


def describe_band(canonical: str) -> str:
    """A pretrained band with the Sentinel-2 band that carries it, when there is one (SWIR_2 (B12))."""
    return f"{canonical} ({_S2_ID[canonical]})" if canonical in _S2_ID else canonical


def canonical_band(name: str, band_map: Mapping[str, str] | None = None) -> str:
    """A dataset band name as a GFM band name: the user's band_map first, then the alias table, else upper-cased."""
    if band_map:
        for key, value in band_map.items():
            if key == name or key.upper() == name.upper():
                return str(value).upper()
    upper = name.strip().upper()
    return BAND_ALIASES.get(upper, upper)


@dataclass(frozen=True)
class InputMapping:
    """How one GFM input (a TerraMind modality, or Prithvi's single image) is cut from the stacked channels.

    `sources[i]` is the stacked-input channel feeding the GFM's channel i, or -1 for a zero-filled
    band; `bands` names the GFM's channels (pretrained bands in pretrained order, then learned extras).
    """

    name: str
    bands: tuple[str, ...]
    sources: tuple[int, ...]
    pretrained: tuple[str, ...]
    zero_filled: tuple[str, ...]
    learned: tuple[str, ...]

    @property
    def num_pretrained(self) -> int:
        return len(self.pretrained)


def map_bands(gfm: str, input_name: str, pretrained: Sequence[str], dataset_bands: Sequence[tuple[int, str, str]],
              band_map: Mapping[str, str] | None = None, missing_bands: MissingBands = "error",
              extra_bands: ExtraBands = "drop") -> InputMapping:
    """Map `dataset_bands` ((stacked channel, modality, band name), in channel order) onto one GFM input.

    Raises one ConfigError sentence naming the bands when the mapping is ambiguous or incomplete.
    """
    pretrained = [str(b).upper() for b in pretrained]
    by_canonical: dict[str, tuple[int, str, str]] = {}
    extras: list[tuple[int, str, str]] = []
    clashes: list[str] = []
    for channel, modality, band in dataset_bands:
        canon = canonical_band(band, band_map)
        if canon in pretrained:
            if canon in by_canonical:
                other = by_canonical[canon]
                clashes.append(f"{other[1]}.{other[2]} and {modality}.{band} to {canon}")
            else:
                by_canonical[canon] = (channel, modality, band)
        else:
            extras.append((channel, modality, band))
    if clashes:
        raise ConfigError(f"model.encoder: several dataset bands map to one band of {gfm}'s {input_name} input "
                          f"({'; '.join(clashes)}); keep one of each (dataset.modalities / the layout's bands) or fix "
                          "model.encoder.band_map.")
    missing = [b for b in pretrained if b not in by_canonical]
    if missing and missing_bands == "error":
        have = ", ".join(f"{m}.{b}" for _, m, b in dataset_bands) or "none"
        raise ConfigError(f"model.encoder: {gfm}'s {input_name} input was pretrained on {', '.join(pretrained)} but "
                          f"the dataset has no band for {', '.join(map(describe_band, missing))} (it has {have}); "
                          "add them to the dataset, name them in model.encoder.band_map, or set "
                          "model.encoder.missing_bands=zero to feed zeros.")
    if missing:
        log.info("model.encoder: %s's %s input gets zeros for %s, which the dataset lacks (missing_bands=zero)", gfm,
                 input_name, ", ".join(map(describe_band, missing)))
    if extra_bands == "learn":
        learn = extras
    elif extra_bands == "drop":
        learn = []
    else:
        wanted = {str(b).upper() for b in extra_bands}
        learn = [e for e in extras if e[2].upper() in wanted or canonical_band(e[2], band_map) in wanted]
    dropped = [e for e in extras if e not in learn]
    if dropped:
        log.info("model.encoder: %s's %s input drops dataset bands %s (not pretrained; model.encoder.extra_bands=learn "
                 "feeds them through new patch-embedding weights)", gfm, input_name,
                 ", ".join(f"{m}.{b}" for _, m, b in dropped))
    sources = [by_canonical[b][0] if b in by_canonical else -1 for b in pretrained] + [e[0] for e in learn]
    learned_names = [f"{m}.{b}" for _, m, b in learn]
    return InputMapping(name=input_name, bands=tuple(pretrained + learned_names), sources=tuple(sources),
                        pretrained=tuple(pretrained), zero_filled=tuple(missing), learned=tuple(learned_names))


def stacked_bands(bands: Mapping[str, Sequence[str]] | None, in_chans: int, gfm: str) -> list[tuple[int, str, str]]:
    """(channel, modality, band) for the stacked input the Segmenter gives an encoder, checked against in_chans."""
    if bands is None:
        raise ConfigError(f"model.encoder ({gfm}) needs the dataset's band names to map them onto its pretrained "
                          "bands; build it through segplat's tasks (train / evaluate / predict / summary with a "
                          "dataset layout that names its bands), not with channels alone.")
    out: list[tuple[int, str, str]] = []
    for modality, names in bands.items():
        for name in names:
            out.append((len(out), str(modality), str(name)))
    if len(out) != in_chans:
        raise ConfigError(f"model.encoder ({gfm}) got {in_chans} input channels but the band names list {len(out)} "
                          f"({', '.join(f'{m}.{b}' for _, m, b in out)}); the dataset's band names and channel counts "
                          "disagree.")
    return out
