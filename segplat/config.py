"""Config checks that need no data, and OmegaConf resolvers.

`check_config` runs first in every task: impossible combinations (a fusion the model does not
support, non-positive sizes) stop here, in one sentence naming the key, before data is read.
"""

from __future__ import annotations

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from segplat.errors import ConfigError


def register_resolvers() -> None:
    """segplat.run_name (one name on every rank) and segplat.rank_zero; also done on `import segplat`."""
    from segplat.utils.dist import register_resolvers as register_dist_resolvers

    register_dist_resolvers()


def check_config(cfg: DictConfig) -> None:
    for key in ("dataset.batch_size", "dataset.patch_size", "trainer.max_epochs"):
        value = OmegaConf.select(cfg, key)
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ConfigError(f"{key}={value} must be a positive integer.")
    for key in ("optimizer.lr", "optimizer.encoder_lr", "optimizer.fusion_lr", "optimizer.decoder_lr"):
        value = OmegaConf.select(cfg, key)
        if value is not None and not (isinstance(value, int | float) and value > 0):
            raise ConfigError(f"{key}={value} must be a positive number.")
    if cfg.callbacks.get("mode") not in ("max", "min"):
        raise ConfigError(f"callbacks.mode={cfg.callbacks.get('mode')} must be max or min.")
    target = OmegaConf.select(cfg, "model._target_")
    if target is None:
        raise ConfigError("model._target_ is missing; choose a model preset such as model=unet.")
    try:
        model_cls = get_class(target)
    except Exception as err:
        raise ConfigError(f"model._target_={target} cannot be imported; check the model preset.") from err
    check = getattr(model_cls, "check_fusion", None)
    modalities = OmegaConf.select(cfg, "dataset.modalities")
    if check is not None and OmegaConf.select(cfg, "model.fusion") is not None:
        check(cfg.model.fusion, len(modalities) if modalities else None)
