"""The production sweep's fusion draws: each is accepted, and distinct draws build distinct models.

Samples `segplat/conf/sweep/fusion_patch_lr.yaml` with the sweeper's own sampling (`segplat.sweep.space`), applies
each draw's fusion overrides to the default model as a trial would, and compares the built models by
their parameters (names and shapes): a draw that only renamed a trial would build the same model.
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from segplat.config import check_config
from segplat.sweep import space
from tests.conftest import CONF_DIR, TINY, compose_train
from tests.models.fusion_helpers import built_fusion, named_fusion, pyramid_depth

SWEEP = CONF_DIR / "sweep" / "fusion_patch_lr.yaml"
MODEL = [o for o in TINY if o.startswith("model.")]


def is_fusion_key(key: str) -> bool:
    return key == "fusion" or key.startswith("fusion.")


def fusion_draws(n_trials: int, seed: int) -> list[tuple[tuple[str, str], ...]]:
    """The distinct fusion parts (key, override text) of `n_trials` random draws from the sweep file."""
    params = space.parse_params(OmegaConf.load(SWEEP).hydra.sweeper.params)
    by_key = {p.key: p for p in params}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    draws = []
    for _ in range(n_trials):
        trial = study.ask()
        chosen = space.suggest(trial, params, None)
        study.tell(trial, 0.0)
        draw = tuple(sorted((k, by_key[k].override_text(v)) for k, v in chosen.items() if is_fusion_key(k)))
        if draw not in draws:
            draws.append(draw)
    return draws


@pytest.mark.slow
def test_distinct_fusion_draws_build_distinct_models(tmp_path: Path) -> None:
    draws = fusion_draws(60, seed=0)
    assert len(draws) >= 4, f"the sweep file searches too little fusion: {draws}"
    models = {}
    for draw in draws:
        cfg = compose_train([*MODEL, *(f"{k}={text}" for k, text in draw)], tmp_path)
        check_config(cfg)  # every draw is accepted by the model the sweep trains
        model = instantiate(cfg.model, modalities={"rgb": 3, "nir": 1}, num_classes=3)
        assert built_fusion(model) == named_fusion(cfg, model, pyramid_depth(model)), draw
        models[draw] = tuple((name, tuple(p.shape)) for name, p in model.named_parameters())
    same = [(a, b) for i, a in enumerate(draws) for b in draws[i + 1:] if models[a] == models[b]]
    assert same == [], f"distinct fusion draws built the same model: {same}"
