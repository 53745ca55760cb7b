"""Geo-foundation-model encoders (Prithvi-EO, TerraMind) for the generic Segmenter; needs the `gfm` extra.

Importing this package never imports TerraTorch: building an encoder does, and says how to install the
extra (`pip install -e ".[gfm]"`) when it is missing.
"""

from segplat.models.encoders.gfm.bands import BAND_ALIASES, InputMapping, canonical_band, map_bands
from segplat.models.encoders.gfm.encoders import GFMEncoder, PrithviEncoder, TerraMindEncoder, terratorch_registry
from segplat.models.encoders.gfm.neck import ViTPyramidNeck

__all__ = ["BAND_ALIASES", "GFMEncoder", "InputMapping", "PrithviEncoder", "TerraMindEncoder", "ViTPyramidNeck",
           "canonical_band", "map_bands", "terratorch_registry"]
