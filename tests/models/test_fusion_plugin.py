"""A fusion type added as CONTRIBUTING.md says: its module + one config file, nothing else touched.

`tests/models/fusion_plugin/` holds the module (`gated_sum.py`) and the entry
(`conf/fusion/mid_gated_sum.yaml`); the test puts that conf folder on Hydra's search path, as a user's
own config folder would be, and every model that builds per-stage modules takes the new type.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from segplat.config import check_config
from segplat.errors import ConfigError
from tests.conftest import CONF_DIR, compose_train
from tests.models.fusion_helpers import TINY, built_fusion, named_fusion, pyramid_depth, tiny_overrides
from tests.models.fusion_plugin.gated_sum import GatedSumFusion

PLUGIN = Path(__file__).parent / "fusion_plugin"
SEARCH_PATH = f"hydra.searchpath=[file://{PLUGIN / 'conf'}]"


def compose(preset: str, *overrides: str, tmp_path: Path):
    return compose_train([SEARCH_PATH, *tiny_overrides(preset), "fusion=mid_gated_sum", *overrides], tmp_path)


def test_nothing_outside_the_plugin_names_the_new_type() -> None:
    repo = CONF_DIR.parents[1]
    mentions = [p for pattern in ("segplat/**/*.py", "segplat/conf/**/*.yaml", "tests/**/*.py", "*.md")
                for p in repo.glob(pattern)
                if "gated_sum" in p.read_text() and PLUGIN not in p.parents and p != Path(__file__)]
    assert mentions == []


@pytest.mark.parametrize("preset, overrides", [("unet", []), ("deeplabv3plus", ["fusion.stages=[1,4]"]),
                                               ("unet3d", []), ("unet3d", ["fusion.level=late"])])
def test_the_new_type_plugs_into_every_model_that_builds_stage_modules(preset, overrides, tmp_path: Path) -> None:
    cfg = compose(preset, *overrides, tmp_path=tmp_path)
    check_config(cfg)
    model = instantiate(cfg.model, modalities=TINY[preset][1], num_classes=3)
    built = built_fusion(model)
    assert built == named_fusion(cfg, model, pyramid_depth(model))
    assert "GatedSumFusion" in built.values()


def test_the_new_module_trains_with_its_own_argument(tmp_path: Path) -> None:
    cfg = compose("unet", "fusion.module.gate_init=2.0", tmp_path=tmp_path)
    check_config(cfg)
    model = instantiate(cfg.model, modalities={"rgb": 3, "nir": 1}, num_classes=3).train()
    fusions = list(model.fusion.values())
    assert all(isinstance(m, GatedSumFusion) for m in fusions)
    assert all(torch.all(m.gates == 2.0) for m in fusions)  # the entry's own argument took effect
    out = model({"rgb": torch.randn(2, 3, 32, 32), "nir": torch.randn(2, 1, 32, 32)})["out"]
    out.mean().backward()
    assert all(m.gates.grad is not None and m.gates.grad.abs().sum() > 0 for m in fusions)


def test_models_with_a_fixed_fusion_refuse_it(tmp_path: Path) -> None:
    cfg = compose("cmx", tmp_path=tmp_path)
    with pytest.raises(ConfigError, match=r"fusion\.type=gated_sum is not supported by CMX.*valid types: frm_ffm"):
        check_config(cfg)


def test_unknown_argument_of_the_new_module_is_refused(tmp_path: Path) -> None:
    cfg = compose("unet", "+fusion.module.gate_bias=1.0", tmp_path=tmp_path)
    with pytest.raises(ConfigError, match=r"fusion\.module\.gate_bias is not a key of fusion\.module; did you mean "
                       r"fusion\.module\.gate_init\?"):
        check_config(cfg)
