"""The rules between config keys, and between a config and its data: what no single key's type can say.

Each key's own type (a positive integer, a probability, one of a few words, a closed section) is declared once, on
the constructor its config targets, and checked by the one walker (`segplat.schema`). What is left is here, each
rule in one place:

- model x fusion x modalities (`check_model_fusion`): the streams a model needs, the fusion it supports;
- the monitored metric vs the classes and its direction (`check_monitor`), `callbacks.mode`;
- a resume vs the run it continues (`check_resumed_config`: what the restored state would override);
- acceleration vs device (`check_acceleration`, `check_sync_batchnorm`);
- patch vs tile (`check_patch_size`, with the grid-alignment rule of `segplat.data.windows`).

`check_rules(cfg)` runs those that need no data; `segplat.config.check_config` calls it after the walker. The
others run where their facts appear (the classes from the layout, the store's tiles, the process count).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from omegaconf import DictConfig, OmegaConf

from segplat.errors import ConfigError
from segplat.messages import did_you_mean
from segplat.schema import check_value
from segplat.utils.plain import to_plain

if TYPE_CHECKING:
    import torch

    from segplat.models.fusion.spec import FusionSpec


def check_rules(cfg: DictConfig) -> None:
    """The rules of a composed training config that need no data (after the walker checked every key's type)."""
    if "callbacks" in cfg:
        check_value("callbacks.mode", Literal["max", "min"], cfg.callbacks.get("mode"))
    if "trainer" in cfg:
        from segplat.engine.acceleration import run_device

        trainer = cfg.trainer
        check_acceleration(trainer.get("compile", False), run_device(bool(trainer.get("cpu", False))),
                           trainer.get("mixed_precision", "no"))
    dataset = cfg.get("dataset")
    if dataset is not None and isinstance(dataset.get("patch_size"), int) and isinstance(dataset.get("tile_size"), int):
        check_patch_size(dataset.patch_size, dataset.tile_size)
    check_model_fusion(cfg)


# -- model x fusion x modalities -----------------------------------------------------------------------------------
def streams_needed(model_cls: type) -> tuple[int, int | None, str] | None:
    """(fewest, most or None, why) input streams a model class takes, from what it declares; None: any number."""
    roles = getattr(model_cls, "stream_roles", None)
    if roles:
        return 2, 2, f"it fuses exactly two ({roles})"
    levels = getattr(model_cls, "supported_fusion", None)
    if levels is not None and "early" not in levels:
        return 2, None, f"it fuses streams at level {' or '.join(levels)} only"
    return None


def check_streams(model_cls: type, modalities: Sequence[str]) -> None:
    """A model that needs N streams on a dataset that gives M says so, before any fusion key is blamed."""
    need = streams_needed(model_cls)
    if need is None:
        return
    least, most, why = need
    count = len(modalities)
    if count >= least and (most is None or count <= most):
        return
    wanted = f"{least}" if most == least else f"{least} or more"
    gives = f"{count} ({', '.join(modalities)})" if modalities else "none"
    raise ConfigError(f"{model_cls.__name__} needs {wanted} input modalities, as {why}, but dataset.modalities gives "
                      f"{gives}; use a dataset with {wanted} modalities (or list them in dataset.modalities), or a "
                      "model that takes any number, e.g. model=unet.")


def check_model_inputs(model_cls: type, specs: Mapping[str, Any]) -> None:
    """The model against the streams the layout describes (name -> ModalitySpec, known before any data): their count
    (`check_streams`) and time series, which a model that takes single images would fail on at its first step."""
    check_streams(model_cls, list(specs))
    series = [m for m, s in specs.items() if getattr(s, "temporal", False)]
    if series and not getattr(model_cls, "takes_time_series", False):
        raise ConfigError(f"{model_cls.__name__} takes single images (B, C, H, W), but {', '.join(series)} "
                          f"{'is a time series' if len(series) == 1 else 'are time series'}; use a model that takes "
                          "them (model=unet3d), or list only single-date modalities in dataset.modalities.")


def check_model_fusion(cfg: DictConfig) -> FusionSpec | None:
    """The model x fusion x modalities rule: the fusion spec the model will build, or a refusal.

    The dataset must give the streams the model needs (`check_streams`), the `fusion` group must reach the model
    (presets take `fusion: ${fusion}`), and the model must accept its level, type and stages (the stage count comes
    from the model config, e.g. its encoder) and the number of modalities (`check_fusion` of the model class).
    """
    from segplat.models.build import fusion_check, model_class
    from segplat.models.fusion.spec import FusionSpec, resolve_fusion

    target = OmegaConf.select(cfg, "model._target_")
    if target is None:
        raise ConfigError("model._target_ is missing; choose a model preset such as model=unet.")
    model_cls = model_class(target)  # importable, and the class-level part of the model contract
    modalities = OmegaConf.select(cfg, "dataset.modalities")
    if modalities:
        check_streams(model_cls, [str(m) for m in modalities])
    group = cfg.get("fusion")
    given = cfg.model.get("fusion") if "fusion" in cfg.model else None
    if group is not None and "fusion" not in cfg.model and resolve_fusion(group) != FusionSpec():
        raise ConfigError(f"model {target} takes no model.fusion, so fusion={to_plain(group)} would be ignored; use "
                          "fusion=early or give the preset `fusion: ${fusion}`.")
    if group is not None and given is not None and to_plain(given) != to_plain(group):
        raise ConfigError(f"model.fusion={to_plain(given)} differs from the fusion group ({to_plain(group)}), "
                          "which the preset would ignore; presets take `fusion: ${fusion}` and fusion is chosen with "
                          "fusion=...")
    if given is None:
        return None
    check = fusion_check(model_cls)
    spec = resolve_fusion(given)
    count = getattr(model_cls, "fusion_stage_count", None)
    num_stages = count(cfg.model) if count is not None and spec is not None and spec.stages is not None else None
    return check(spec, len(modalities) if modalities else None, num_stages)


# -- the monitored metric ------------------------------------------------------------------------------------------
def check_monitor(monitor: str, class_names: Sequence[str], mode: str | None = None) -> None:
    """`callbacks.monitor` must be a metric validation logs (known from the classes), followed in its own direction
    (`mode`, when given); refused in one sentence with the nearest metric or the mode to set."""
    from segplat.metrics import monitor_mode, validation_metric_names

    names = validation_metric_names(class_names)
    if monitor not in names:
        near = did_you_mean(monitor, names)
        hint = f"did you mean {near}? " if near else ""
        raise ConfigError(f"callbacks.monitor={monitor} is not a metric validation logs; {hint}choose one of "
                          f"{', '.join(names)}.")
    want = monitor_mode(monitor)
    if mode is not None and mode != want:
        raise ConfigError(f"callbacks.monitor={monitor} {'falls' if want == 'min' else 'rises'} as the model improves, "
                          f"but callbacks.mode={mode}: the best checkpoint, early stopping, the plateau schedule and a "
                          f"sweep's direction would all follow it the wrong way; set callbacks.mode={want}.")


# -- resume vs config ----------------------------------------------------------------------------------------------
# config parts a resumed run restores from the checkpoint (optimiser param groups, schedule state), so a value
# changed on the command line would be written to config.yaml but never take effect
RESTORED_ON_RESUME = ("optimizer", "scheduler")


def check_resumed_config(state: Mapping[str, Any], cfg: DictConfig, source: str | Path) -> None:
    """Refuse a resume whose optimiser or schedule keys differ from the run's, or whose max_epochs is already done."""
    text = state.get("config")
    if not text:
        return
    from segplat.engine.checkpoint import stored_config

    old = stored_config(text, source)
    changed = []
    for part in RESTORED_ON_RESUME:
        if part not in cfg or part not in old:
            continue
        raw = _flat(OmegaConf.to_container(cfg[part], resolve=False))
        now, before = _flat(OmegaConf.to_container(cfg[part], resolve=True)), _flat(old[part])
        for key in sorted(set(now) | set(before)):
            if isinstance(raw.get(key), str) and "${" in raw[key]:
                continue  # follows another key (e.g. trainer.max_epochs), which may change on a resume
            if now.get(key) != before.get(key):
                changed.append(f"{part}.{key}={now.get(key)} (the run's: {before.get(key)})")
    if changed:
        raise ConfigError(f"trainer.resume: {'; '.join(changed[:3])} differ from the run in {source}, whose "
                          "optimiser and schedule state is restored, so the change would not take effect; resume "
                          "with the run's values, or start a new run from its weights "
                          "(model.pretrained=<run>/checkpoints/best.ckpt).")
    done = int(state.get("trainer", {}).get("epoch", 0) or 0)
    max_epochs = OmegaConf.select(cfg, "trainer.max_epochs")
    if isinstance(max_epochs, int) and max_epochs < done:
        raise ConfigError(f"trainer.max_epochs={max_epochs} but the run in {source} has already completed {done} "
                          f"epochs; give trainer.max_epochs above {done} to train on.")


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix.rstrip("."): node} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


# -- acceleration vs device ----------------------------------------------------------------------------------------
def check_acceleration(compile: bool, device: torch.device | str | None = None, mixed_precision: str = "no",
                       compile_options: Mapping[str, Any] | None = None) -> None:
    """`trainer.compile` needs its backend's toolchain on the run's device, `trainer.mixed_precision=fp16` a CUDA
    device; cheap, so the trainer's constructor and `check_config` call it before any data (`prepare_model` again)."""
    from segplat.engine.acceleration import compile_unavailable_reason

    if compile and dict(compile_options or {}).get("backend", "inductor") == "inductor":
        reason = compile_unavailable_reason(device)
        if reason is not None:
            raise ConfigError(f"trainer.compile=true cannot run here: {reason}; or set trainer.compile=false.")
    if mixed_precision == "fp16" and str(device or "cpu").split(":")[0] != "cuda":
        raise ConfigError("trainer.mixed_precision=fp16 needs a CUDA device; use bf16 or no on CPU.")


def check_sync_batchnorm(value: str | bool, num_processes: int, on_gpu: bool) -> None:
    """torch has no SyncBatchNorm on CPU: each process then normalises with its own micro-batch's statistics, so
    `true` is refused there rather than ignored."""
    if value is True and num_processes > 1 and not on_gpu:
        raise ConfigError("trainer.sync_batchnorm=true needs GPUs (torch's SyncBatchNorm runs on CUDA only); use auto "
                          "or false for several CPU processes, where each normalises its own micro-batch.")


# -- patch vs tile -------------------------------------------------------------------------------------------------
def check_patch_size(patch_size: int, tile_size: int, scales: Mapping[str, float] | None = None,
                     tiles: str | None = None) -> None:
    """`dataset.patch_size` fits the tiles (`tiles`: whose, once a store holds them; before, the config's
    `dataset.tile_size`) and maps to whole pixels of every modality (name -> scale, once known)."""
    if patch_size > tile_size:
        where = f"the {tiles} tiles ({tile_size} px)" if tiles else f"dataset.tile_size={tile_size}"
        raise ConfigError(f"dataset.patch_size={patch_size} is larger than {where}; lower dataset.patch_size or "
                          "re-prepare with a larger dataset.tile_size.")
    if scales:
        from segplat.data.windows import check_grid_alignment

        check_grid_alignment(patch_size, scales, "dataset.patch_size")

