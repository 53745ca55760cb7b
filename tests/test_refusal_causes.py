"""Every named model preset against every shipped dataset and experiment: accepted, or refused for the real cause.

`model=cmx experiment=synthetic_rgb_only` used to blame `fusion.level=early` (the experiment's fusion) when the
cause was that CMX fuses two modalities and the experiment gives one; a single-image model on a time-series dataset
passed every check and failed at its first step with a tensor-shape error. The table below says, for each pair,
which sentence the user gets. Composing configs only: `check_config` (the walker and `segplat.rules`), then the
model against the streams the layout describes (`check_model_inputs`), the two checks a run makes before any data.
"""

from __future__ import annotations

import pytest
from hydra.utils import get_class, instantiate

from segplat.config import check_config
from segplat.errors import ConfigError
from segplat.rules import check_model_inputs
from tests.conftest import CONF_DIR, compose_train

MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
DATA = [f"dataset={p.stem}" for p in sorted((CONF_DIR / "dataset").glob("*.yaml"))] + \
       [f"experiment={p.stem}" for p in sorted((CONF_DIR / "experiment").glob("*.yaml"))]
# what a layout otherwise reads from its files to describe itself (time series length; a GeoTIFF's dtype and nodata)
DESCRIBED = {"dataset=s1s2_series": ["dataset.layout.max_time=6"],
             "dataset=geotiff": [f"dataset.layout.modalities.{m}.{k}={v}" for m, k, v in (
                 ("optical", "dtype", "uint16"), ("optical", "nodata", 0), ("sar", "dtype", "float32"),
                 ("sar", "nodata", "nan"))]}

TWO_STREAMS = "needs 2 input modalities, as it fuses exactly two"
SERIES = "takes single images (B, C, H, W), but s2, s1 are time series; use a model that takes them (model=unet3d)"
FIXED = "is not supported by {model}; valid levels: mid ({model}'s fusion is fixed"
FIXED_TYPE = "fusion.type=concat is not supported by {model} at level mid; valid types:"
FIXED_FUSION = {"cmx": "CMX", "dualstream": "DualStream", "ms2mnet": "MS2MNet"}
SINGLE_IMAGE = {"cmx": "CMX", "deeplabv3plus": "Segmenter", "dualstream": "DualStream", "ms2mnet": "MS2MNet",
                "prithvi": "Segmenter", "segformer": "SegFormer", "terramind": "Segmenter", "unet": "Segmenter"}


def expected(model: str, data: str) -> str | None:
    """The cause a pair is refused for (a fragment of its sentence), or None when it is accepted."""
    if data == "dataset=s1s2_series" and model in SINGLE_IMAGE:
        return f"{SINGLE_IMAGE[model]} {SERIES}"
    if model in FIXED_FUSION:
        name = FIXED_FUSION[model]
        if data == "experiment=synthetic_rgb_only":  # one modality: the stream count, not the experiment's fusion
            return f"{name} {TWO_STREAMS}"
        if data == "experiment=sen1floods11_gfm":  # two modalities, but the experiment chooses early fusion
            return f"fusion.level=early {FIXED.format(model=name)}"
        if data == "experiment=synthetic_mid_fusion":  # mid fusion of another type than the model's own
            return FIXED_TYPE.format(model=name)
    if model == "segformer" and data == "experiment=synthetic_mid_fusion":
        return "fusion.level=mid is not supported by SegFormer; valid levels: early."
    return None


def refusal(model: str, data: str) -> str | None:
    cfg = compose_train([f"model={model}", data, *DESCRIBED.get(data, [])])
    try:
        check_config(cfg)
        specs = instantiate(cfg.dataset.layout, root=None).modalities  # the layout's description: no file is read
        chosen = list(cfg.dataset.modalities or specs)
        check_model_inputs(get_class(cfg.model._target_), {m: specs[m] for m in chosen})
    except ConfigError as err:
        return str(err)
    return None


def check_pair(model: str, data: str) -> None:
    want, got = expected(model, data), refusal(model, data)
    if want is None:
        assert got is None, f"model={model} {data} is refused: {got}"
    else:
        assert got is not None and want in got, f"model={model} {data}: expected ...{want}..., got {got}"
        assert "\n" not in got and got.endswith((".", "?")), got


@pytest.mark.parametrize(("model", "data"), [("cmx", "experiment=synthetic_rgb_only"),
                                             ("unet", "dataset=s1s2_series"), ("unet3d", "dataset=s1s2_series")])
def test_the_cause_is_named(model: str, data: str) -> None:
    """The two causes that used to be misnamed (or met only as a traceback), and the model that takes series."""
    check_pair(model, data)


@pytest.mark.slow
@pytest.mark.parametrize("data", DATA)
def test_every_preset_on_every_shipped_dataset_and_experiment(data: str) -> None:
    for model in MODELS:
        check_pair(model, data)


def test_the_table_covers_what_ships() -> None:
    """A new preset, dataset or experiment enters the table (and a renamed one leaves no stale row)."""
    assert set(SINGLE_IMAGE) | {"unet3d"} == set(MODELS)
    assert set(FIXED_FUSION) <= set(MODELS) and set(DESCRIBED) <= set(DATA)
