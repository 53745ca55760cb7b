"""Checkpoints: the one owner of what a checkpoint holds, how it is written and how it is read.

Two kinds, written atomically (temp file + rename: a kill during a save leaves the previous file intact)
and loaded with `torch.load(weights_only=True)`, so every value is a tensor or plain data:

| key | `last.ckpt` (kind `training`) | `best.ckpt` (kind `inference`) |
| --- | --- | --- |
| `format`, `kind` | yes | yes |
| `model` (state dict) | yes | yes |
| `meta` (model target, classes, modalities, fusion: checked on resume) | yes | yes |
| `data` (classes, palette, ignore index, band specs, statistics, patch size, dataset) | yes | yes |
| `config` (the resolved run config, YAML) | yes | yes |
| `trainer` (epoch, step, best score and epoch) | yes | yes |
| `optimizer`, `scheduler`, `scaler`, `rng`, `callbacks`, `loggers` | yes | no |

`last.ckpt` is the full resume state; `best.ckpt` is what prediction, evaluation and fine-tuning
(`model.pretrained=<best.ckpt>`) need, without the optimiser moments that double its size.

Resume: `trainer.resume` is resolved once (`resume_point`, which also applies the run-folder rule
before any data is read) and the checkpoint is loaded once (`ResumePoint.take`).

A checkpoint is untrusted input: its stored config is YAML that prediction and evaluation build
models and datasets from. `inference_config` lets through only what the model, fusion and dataset
configs on this machine's search path name as `_target_` (segplat's own and the user's config folders
given to the command; exact strings, checked before anything is imported), with plain values as
arguments; anything else refuses the checkpoint in one sentence naming the key.
"""

from __future__ import annotations

import functools
import json
import logging
import pickle
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any

import torch
import yaml
from annotated_types import MinLen
from omegaconf import DictConfig, OmegaConf

from segplat.config import CONF_DIR
from segplat.data.layouts.base import RGB, ModalitySpec
from segplat.errors import CheckpointError, ConfigError
from segplat.messages import first_line
from segplat.schema import PositiveInt, check_section, section
from segplat.utils.bounded_yaml import load_bounded
from segplat.utils.io import atomic_write

log = logging.getLogger("segplat")

CHECKPOINT_FORMAT = 1
LAST = "last.ckpt"
BEST = "best.ckpt"
TRAINING, INFERENCE = "training", "inference"
# what each kind holds (besides `format` and `kind`)
INFERENCE_KEYS = ("model", "meta", "data", "config", "trainer")
TRAINING_KEYS = (*INFERENCE_KEYS, "optimizer", "scheduler", "scaler", "rng", "callbacks", "loggers")


# -- what a run says about itself ----------------------------------------------------------------------
@section
@dataclass(frozen=True)
class DataFacts:
    """A checkpoint's `data` section: what prediction and evaluation need to know about the data without the data.

    Stored as plain data (`torch.load(weights_only=True)` reads it): one writer, `to_state`, used by every
    checkpoint a run saves, and one reader, `from_state`, which refuses a missing or odd field naming the file."""

    classes: Annotated[list[str], MinLen(1)]
    palette: Sequence[RGB]
    ignore_index: int
    modalities: Annotated[dict[str, dict[str, Any]], MinLen(1)]  # name -> ModalitySpec.to_attrs(), input order
    stats: dict[str, dict[str, Any]]  # name -> normalisation statistics (mean, std, p2, p98 per band)
    patch_size: PositiveInt  # the training patch: prediction's default window
    dataset: str  # the dataset config's name

    @classmethod
    def of(cls, info: Any, patch_size: int, dataset: str) -> DataFacts:
        """From a run's `DataInfo` (after the store is open: the statistics are the store's)."""
        return cls(classes=list(info.classes), palette=[tuple(int(v) for v in c) for c in info.palette],
                   ignore_index=int(info.ignore_index), modalities={m: s.to_attrs() for m, s in info.specs.items()},
                   stats=dict(info.stats), patch_size=int(patch_size), dataset=str(dataset))

    def to_state(self) -> dict[str, Any]:
        """The `data` section as written (lists and dicts only)."""
        return {"classes": list(self.classes), "palette": [list(c) for c in self.palette],
                "ignore_index": self.ignore_index, "modalities": dict(self.modalities), "stats": dict(self.stats),
                "patch_size": self.patch_size, "dataset": self.dataset}

    @classmethod
    def from_state(cls, data: Any, source: str | Path) -> DataFacts:
        """The `data` section of the checkpoint at `source`, every field checked against its type."""
        def refuse(problem: str) -> CheckpointError:
            return CheckpointError(f"checkpoint {source}: {problem}; it was not written by this segplat (or is "
                                   "damaged): predict from a run trained with this version.")

        if not isinstance(data, Mapping) or not data:
            raise refuse("it carries no data facts (classes, band specs, statistics)")
        missing = [f.name for f in fields(cls) if f.name not in data]
        if missing:
            raise refuse(f"its data section lacks {', '.join(missing)}")
        try:
            check_section("data", cls, data)
            facts = cls(**{**data, "palette": [tuple(c) for c in data["palette"]]})
            facts.specs  # noqa: B018 (every modality's attributes build a ModalitySpec)
        except (ConfigError, TypeError, ValueError, KeyError) as err:
            raise refuse(f"its data section is not what segplat writes ({first_line(err)})") from None
        absent = [m for m in facts.modalities if m not in facts.stats]
        if absent:
            raise refuse(f"its data section has no statistics for {', '.join(absent)}")
        if len(facts.palette) != len(facts.classes):
            raise refuse(f"its data section has {len(facts.palette)} palette colours for {len(facts.classes)} classes")
        return facts

    @property
    def specs(self) -> dict[str, ModalitySpec]:
        return {m: ModalitySpec.from_attrs(a) for m, a in self.modalities.items()}


@dataclass(frozen=True)
class RunFacts:
    """What a checkpoint carries beside tensors: `meta` is compared on resume, `data` and `config` let a
    checkpoint predict without the training data or the run folder."""

    meta: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] | None = None
    config: str | None = None

    @classmethod
    def of_run(cls, cfg: DictConfig, model_cls: type, info: Any, datamodule: Any) -> RunFacts:
        from segplat.models.fusion.spec import resolve_fusion

        # what a resumed run must share: level, type and stages (the module's arguments are checked by the weights)
        spec = resolve_fusion(cfg.model.get("fusion", cfg.get("fusion")))
        fusion = None if spec is None else {"level": spec.level, "type": spec.type,
                                            "stages": list(spec.stages) if spec.stages else None}
        meta = {"model_target": f"{model_cls.__module__}.{model_cls.__qualname__}", "classes": list(info.classes),
                "modalities": dict(info.modalities), "fusion": fusion}
        data = DataFacts.of(info, datamodule.patch_size, datamodule.name).to_state()
        return cls(meta, data, OmegaConf.to_yaml(cfg, resolve=True))


def training_state(facts: RunFacts, *, model: Mapping[str, Any], optimizer: Mapping[str, Any],
                   scheduler: Mapping[str, Any] | None, scaler: Mapping[str, Any] | None, rng: Mapping[str, Any],
                   trainer: Mapping[str, Any], callbacks: Mapping[str, Any],
                   loggers: Mapping[str, Any]) -> dict[str, Any]:
    """The full resume state (`last.ckpt`)."""
    return {"kind": TRAINING, "model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler,
            "rng": rng, "trainer": dict(trainer), "callbacks": dict(callbacks), "loggers": dict(loggers),
            "meta": facts.meta, "data": facts.data, "config": facts.config}


def inference_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a training state that prediction and fine-tuning need (`best.ckpt`)."""
    return {"kind": INFERENCE, **{k: state.get(k) for k in INFERENCE_KEYS}}


# -- writing and reading -----------------------------------------------------------------------------
def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    state = {"format": CHECKPOINT_FORMAT, **state}
    return atomic_write(path, lambda p: torch.save(state, p))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint {path} does not exist; give a run folder or a .ckpt file.") from err
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"checkpoint {path} {refused_object(err)}; segplat never unpickles code, so it was not "
                              "loaded: use a checkpoint written by segplat.") from err
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} could not be loaded ({type(err).__name__}: {err}); it is not a "
                              "complete segplat checkpoint.") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "model" not in state:
        raise CheckpointError(f"{path} is not a segplat checkpoint (format {CHECKPOINT_FORMAT}).")
    # files written before `kind` existed held the full state
    state.setdefault("kind", TRAINING if "optimizer" in state else INFERENCE)
    return state


def refused_object(err: pickle.UnpicklingError) -> str:
    """What `torch.load(weights_only=True)` refused, in a few words (its own message is a page long)."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    what = f" ({found.group(1)})" if found else ""
    return f"holds a Python object{what} that is not a tensor or plain data"


def find_checkpoint(location: str | Path, prefer: str = LAST, key: str = "ckpt") -> Path:
    """A .ckpt file as given, or `checkpoints/<prefer>` (then any *.ckpt, newest) inside a run folder.

    `key` is the config key the location came from (`ckpt`, `trainer.resume`), named in the errors.
    """
    p = Path(location).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        for folder in (p / "checkpoints", p):
            if (folder / prefer).is_file():
                return folder / prefer
            found = sorted(folder.glob("*.ckpt"), key=lambda f: f.stat().st_mtime)
            if found:
                return found[-1]
        raise CheckpointError(f"{key}={p}: no checkpoint in that folder (looked for checkpoints/{prefer} and *.ckpt); "
                              "give a run folder that has trained for at least one epoch.")
    raise CheckpointError(f"{key}={p} does not exist; give a run folder or a .ckpt file.")


def check_compatible(state: dict[str, Any], meta: Mapping[str, Any], source: str) -> None:
    """Refuse a checkpoint written by another model, class table or modality set."""
    old = state.get("meta", {})
    for key, what in (("model_target", "model"), ("classes", "classes"), ("modalities", "modalities"),
                      ("fusion", "fusion")):
        if key in old and key in meta and old[key] != meta[key]:
            raise CheckpointError(f"checkpoint {source} was trained with {what} {old[key]} but this run builds "
                                  f"{meta[key]}; use a matching config or start a new run.")


def stored_config(text: Any, source: str | Path) -> dict[str, Any]:
    """A checkpoint's stored config (YAML text), parsed within bounds (size, alias expansion: see
    `segplat.utils.bounded_yaml`): the one way a checkpoint's config is read."""
    if not isinstance(text, str):
        raise CheckpointError(f"checkpoint {source} holds a config that is not YAML text; use a checkpoint written by "
                              "segplat.")
    data = load_bounded(text, f"the config stored in checkpoint {source}", CheckpointError,
                        "use a checkpoint written by segplat.")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {source} holds a config that is not a mapping of keys; use a checkpoint "
                              "written by segplat.")
    return data


# -- resume and the run folder ------------------------------------------------------------------------
@dataclass
class ResumePoint:
    """Where training starts: nothing (a new run) or a checkpoint, resolved once and loaded once."""

    path: Path | None = None
    _state: dict[str, Any] | None = None

    def load(self) -> dict[str, Any] | None:
        """Load (once) and check that the file is a full training state; None for a new run."""
        if self.path is not None and self._state is None:
            state = load_checkpoint(self.path)
            if state["kind"] != TRAINING:
                raise CheckpointError(f"trainer.resume: {self.path} holds weights for prediction only ({BEST} keeps "
                                      f"no optimiser state); resume from the run's checkpoints/{LAST}, or fine-tune "
                                      "from it in a new run with model.pretrained.")
            self._state = state
        return self._state

    def take(self) -> dict[str, Any] | None:
        """The loaded state, handed over once (the trainer keeps no second copy of it)."""
        state, self._state = self.load(), None
        return state


# files a run writes; "history" is what a new start would mix its own with
HISTORY_FILES = ("metrics.jsonl", "summary.json", "curves.png", "confusion_matrix.png")
HISTORY_DIRS = ("checkpoints", "visuals", "tensorboard")


def metrics_records(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    count = 0
    for line in path.read_text().splitlines():
        try:
            count += isinstance(json.loads(line), dict)
        except json.JSONDecodeError:
            continue  # a line torn by a kill
    return count


def clear_history(run_dir: Path) -> None:
    """Remove what an earlier start wrote (config.yaml and .hydra/ stay: this start rewrites them)."""
    for name in HISTORY_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for name in HISTORY_DIRS:
        shutil.rmtree(run_dir / name, ignore_errors=True)


def remove_stale_temporaries(run_dir: Path) -> None:
    """Temporary files of atomic writes that a kill interrupted (`.last.ckpt.x1y2.tmp`, up to a checkpoint's size)."""
    stale = [f for folder in (run_dir, run_dir / "checkpoints", run_dir / "visuals") if folder.is_dir()
             for f in folder.glob(".*.tmp") if f.is_file()]
    if not stale:
        return
    size = sum(f.stat().st_size for f in stale)
    for f in stale:
        f.unlink(missing_ok=True)
    log.info("removed %d temporary file(s) (%.1f MB) left in %s by an interrupted save", len(stale), size / 2**20,
             run_dir)


def resume_point(run_dir: Path, resume: str | None, overwrite: bool = False, main_process: bool = True) -> ResumePoint:
    """Resolve `trainer.resume` and apply the run-folder rule, before any data is read.

    A folder that holds checkpoints is never trained into from scratch: that stops in one sentence unless
    `trainer.overwrite=true` clears it. `resume=auto` without `last.ckpt` starts from scratch only when no
    checkpoint is there (a run stopped before its first one was complete): its partial `metrics.jsonl`
    is cleared, and the log says so. Only the main process changes files; every rank decides alike.
    """
    run_dir = Path(run_dir)
    resume = None if resume in (None, "", "none", False) else str(resume)
    if overwrite and resume is not None:
        raise ConfigError(f"trainer.overwrite=true starts {run_dir} from scratch and trainer.resume={resume} continues "
                          "it; set only one of them.")
    if main_process:
        remove_stale_temporaries(run_dir)
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    records = metrics_records(run_dir)
    if resume not in (None, "auto"):
        path = find_checkpoint(resume, key="trainer.resume")
        if (checkpoints or records) and path.resolve().parent != (run_dir / "checkpoints").resolve():
            raise ConfigError(f"trainer.resume={resume} continues another run, but run folder {run_dir} already holds "
                              "one; give a new run_name for the continued run.")
        return ResumePoint(path)
    if resume == "auto" and LAST in checkpoints:
        return ResumePoint(run_dir / "checkpoints" / LAST)
    if checkpoints or records:
        start_again(run_dir, resume, overwrite, checkpoints, records, main_process)
    return ResumePoint()


def start_again(run_dir: Path, resume: str | None, overwrite: bool, checkpoints: list[str], records: int,
                main_process: bool) -> None:
    """A start from scratch in a folder with history: clear it (overwrite, or auto with no checkpoint) or refuse."""
    held = ", ".join([f"checkpoints/{c}" for c in checkpoints] + ([f"metrics.jsonl ({records} records)"] if records
                                                                   else []))
    if overwrite:
        reason = "trainer.overwrite=true: cleared %s from %s; training starts from scratch"
    elif resume == "auto" and not checkpoints:
        reason = ("trainer.resume=auto: no checkpoint yet (the run stopped before its first one was complete), so "
                  "%s of %s were cleared and the run starts from scratch")
    elif resume == "auto":
        raise ConfigError(f"trainer.resume=auto: {run_dir} holds {held} but no checkpoints/{LAST} to resume from; "
                          "give trainer.resume=<a training checkpoint>, a new run_name, or trainer.overwrite=true to "
                          "start this folder again from scratch.")
    else:
        raise ConfigError(f"run folder {run_dir} already holds a run ({held}); continue it with trainer.resume=auto, "
                          "choose a new run_name, or set trainer.overwrite=true to start it again from scratch.")
    if main_process:
        clear_history(run_dir)
    log.warning(reason, held, run_dir)


# -- the stored config of an untrusted checkpoint ----------------------------------------------------
# the config groups whose `_target_`s a checkpoint may name: what prediction and evaluation build
TRUSTED_GROUPS = ("model", "fusion", "dataset")
# builders a model config may name beyond the shipped presets (MiT sizes for a stream's encoder)
EXTRA_TRUSTED_TARGETS = frozenset(f"segplat.models.encoders.mit.mit_b{i}" for i in range(6))
# Hydra's instantiate keys that only steer how a trusted target is called
_BUILD_KEYS = frozenset({"_target_", "_partial_", "_recursive_", "_convert_", "_args_"})
# dataset keys that say where to read and write on the machine that trained; never taken from a checkpoint
DATASET_LOCATION_KEYS = ("store_dir", "store_path", "store_uri", "cache_dir")


def _targets_in(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "_target_" and isinstance(value, str):
                yield value
            else:
                yield from _targets_in(value)
    elif isinstance(node, list):
        for value in node:
            yield from _targets_in(value)


def _targets_of(conf_dir: Path) -> frozenset[str]:
    """The `_target_`s of one config folder's trusted groups."""
    found: set[str] = set()
    for group in TRUSTED_GROUPS:
        for file in sorted((conf_dir / group).rglob("*.yaml")):
            try:
                found.update(_targets_in(yaml.safe_load(file.read_text())))
            except yaml.YAMLError as err:
                raise ConfigError(f"{file} is not valid YAML ({str(err).splitlines()[0]}); fix it, or give another "
                                  "config folder.") from err
    return frozenset(found)


def trusted_targets(searchpath: Sequence[str | Path] = ()) -> frozenset[str]:
    """Every `_target_` named in the model, fusion and dataset configs on this machine's search path: segplat's own
    (conf/, plus MiT sizes) and the user's config folders given to this command (`searchpath`: Hydra's
    `hydra.searchpath` entries), never anything a checkpoint says.

    Derived from the configs so that a new model or fusion type (its module + one config file, in segplat or in a
    user's project) is trusted without a second list to keep in step. A user's folder is read on every call (it may
    change within a notebook session); segplat's own once.
    """
    from segplat.utils.searchpath import user_config_dirs

    found = set(_shipped_targets())
    for folder in user_config_dirs(searchpath):
        found |= _targets_of(folder)
    return frozenset(found)


@functools.cache
def _shipped_targets() -> frozenset[str]:
    return EXTRA_TRUSTED_TARGETS | _targets_of(CONF_DIR)


def check_buildable(node: Any, where: str, source: str | Path, trusted: frozenset[str] | None = None) -> None:
    """Refuse any `_target_` that no local model, fusion or dataset config names, any other Hydra key, and any
    interpolation, at any depth."""
    trusted = trusted_targets() if trusted is None else trusted

    def refuse(what: str, why: str = "only the model, fusion and dataset builders that configs on this machine "
                                     "name may be named in a checkpoint") -> CheckpointError:
        return CheckpointError(f"checkpoint {source} {what}; refusing to build from it ({why}).")

    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{where}.{key}"
            if isinstance(key, int) and not isinstance(key, bool):  # a value table ({90: 0}): never a Hydra key
                check_buildable(value, path, source, trusted)
                continue
            if not isinstance(key, str):
                raise refuse(f"has a non-text key {key!r} under {where}")
            if key == "_target_":
                if not isinstance(value, str) or value not in trusted:
                    raise refuse(f"names {path}={value!r}, which no model, fusion or dataset config on this "
                                 "machine's search path names", "if it is your own, give this command the folder of "
                                 "your configs: hydra.searchpath=[file://DIR] on the command line, searchpath=[DIR] "
                                 "for segplat.load_model")
            elif key.startswith("_") and key.endswith("_") and key not in _BUILD_KEYS:
                raise refuse(f"sets the Hydra key {path}")
            else:
                check_buildable(value, path, source, trusted)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            check_buildable(value, f"{where}[{i}]", source, trusted)
    elif isinstance(node, str):
        if "${" in node:
            raise refuse(f"holds an interpolation at {where} ({node!r})")
    elif node is not None and not isinstance(node, bool | int | float):
        raise refuse(f"holds a {type(node).__name__} at {where}")


def _drop_pretrained(node: Any, where: str) -> None:
    """The checkpoint's weights replace any pretrained file: never open a path the checkpoint names."""
    if isinstance(node, dict):
        for key, value in node.items():
            if (key == "pretrained" or key.endswith("_pretrained")) and isinstance(value, str):
                log.info("%s.%s=%s is not loaded: the checkpoint's weights replace it", where, key, value)
                node[key] = None
            else:
                _drop_pretrained(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _drop_pretrained(value, f"{where}[{i}]")


def inference_config(state: dict[str, Any], source: str | Path, searchpath: Sequence[str | Path] = ()) -> DictConfig:
    """The `model` and `dataset` parts of a checkpoint's stored config, checked so that building them runs only
    builders that the configs on this machine's search path name (segplat's own and the user's folders in
    `searchpath`), with plain values; pretrained paths and store locations are dropped."""
    text = state.get("config")
    if not isinstance(text, str):
        raise CheckpointError(f"checkpoint {source} carries no config (written by an older segplat); predict from a "
                              "run trained with this version.")
    stored = stored_config(text, source)
    if not isinstance(stored.get("model"), dict):
        raise CheckpointError(f"checkpoint {source} has no model config; use a checkpoint written by segplat.")
    parts = {"model": stored["model"], "dataset": stored.get("dataset") or {}}
    trusted = trusted_targets(searchpath)
    for name, node in parts.items():
        check_buildable(node, name, source, trusted)
    _drop_pretrained(parts["model"], "model")
    for key in DATASET_LOCATION_KEYS:
        parts["dataset"].pop(key, None)
    return OmegaConf.create(parts)


def run_config_target(run_dir: Path) -> str | None:
    """`model._target_` of a run folder's config.yaml (None when the folder has none)."""
    file = run_dir / "config.yaml"
    if not file.is_file():
        return None
    cfg = load_bounded(file.read_text(errors="replace"), str(file), CheckpointError,
                       "give the checkpoint file itself rather than its run folder.")
    model = cfg.get("model") if isinstance(cfg, dict) else None
    return model.get("_target_") if isinstance(model, dict) else None


def check_belongs_to_run(location: str | Path, checkpoint: Path, config: DictConfig) -> None:
    """A run folder's checkpoint must have been written by that run (same model), not copied in from another."""
    run_dir = Path(location).expanduser()
    if not run_dir.is_dir():
        return
    expected = run_config_target(run_dir)
    found = OmegaConf.select(config, "model._target_")
    if expected is not None and expected != found:
        raise CheckpointError(f"{checkpoint} holds a {found} model but the run folder's config.yaml trains {expected}; "
                              "it belongs to another run: give that run's folder or the .ckpt file itself.")
