"""What a sweep leaves in its folder, rewritten by each worker when it finishes (atomic writes):

- `trials.csv`: `study.trials_dataframe()` (every trial, every state);
- `experiment/best.yaml` (single objective) or `experiment/pareto_<trial>.yaml` (multi-objective):
  `# @package _global_` files, so `python -m segplat.train experiment=best
  hydra.searchpath=[file://<sweep dir>]` (or a copy into conf/experiment/) trains the winner;
- `history.png`, `importance.png` (or `pareto_front.png`): optuna's matplotlib plots;
- `sweep_summary.json`: counts per state, the best trial(s), where the study lives;
- `optimization_results.yaml`: hydra-optuna-sweeper's file, as that plugin writes it (`name: optuna`,
  `best_params` and `best_value`; with several objectives `solutions: [{params, values}]`), so tools
  reading the peer's results read segplat's.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

from segplat.sweep.space import Param
from segplat.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"a.b": 1} -> {"a": {"b": 1}}."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def experiment_yaml(trial: optuna.trial.FrozenTrial, params: Sequence[Param], groups: set[str],
                    study_name: str) -> str:
    """A `# @package _global_` experiment with the trial's parameters (config groups as defaults)."""
    by_key = {p.key: p for p in params}
    values, defaults = {}, []
    for key, value in trial.params.items():
        value = by_key[key].python_value(value) if key in by_key else value
        key = key.lstrip("+")  # a custom_search_space key that adds one (`+w`): an experiment file just sets it
        if key in groups:
            defaults.append({f"override /{key}": value})
        else:
            values[key] = value
    body: dict[str, Any] = {}
    if defaults:
        body["defaults"] = defaults
    body.update(nested(values))
    score = trial.values if trial.values is not None else []
    head = (f"# @package _global_\n# Trial {trial.number} of Optuna study {study_name!r}: objective value(s) "
            f"{', '.join(f'{v:.6g}' for v in score)}.\n# Use: python -m segplat.train experiment=<this file's name> "
            "(copy it into conf/experiment/, or add hydra.searchpath=[file://<sweep dir>]).\n")
    return head + yaml.safe_dump(body, sort_keys=False)


def _plot(fn, path: Path, study: optuna.Study, **kwargs: Any) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ax = fn(study, **kwargs)
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.tight_layout()
        tmp = path.with_suffix(".tmp.png")
        fig.savefig(tmp, dpi=100)
        tmp.replace(path)
        plt.close(fig)
        return True
    except Exception as err:  # a plot is a convenience; never let it fail the sweep
        log.warning("could not draw %s: %s", path.name, err)
        plt.close("all")
        return False


def write_outputs(study: optuna.Study, sweep_dir: Path, params: Sequence[Param], groups: set[str],
                  storage_label: str, objective_names: Sequence[str]) -> dict[str, Any]:
    """Write everything listed in the module docstring; returns sweep_summary.json's content."""
    from optuna.visualization import matplotlib as ovm

    sweep_dir.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    df = study.trials_dataframe()
    atomic_write_text(sweep_dir / "trials.csv", df.to_csv(index=False))
    exp_dir = sweep_dir / "experiment"
    exp_dir.mkdir(exist_ok=True)
    multi = len(study.directions) > 1
    summary: dict[str, Any] = {"study_name": study.study_name, "storage": storage_label, "counts": counts,
                               "directions": [d.name.lower() for d in study.directions],
                               "objectives": list(objective_names), "files": {"trials": "trials.csv"}}
    plots: dict[str, str] = {}
    if complete:
        best = study.best_trials if multi else [study.best_trial]
        summary["best_trials"] = [{"number": t.number, "values": t.values, "params": t.params,
                                   "run_dir": t.user_attrs.get("run_dir")} for t in best]
        names = []
        for t in best:
            name = f"pareto_{t.number:04d}.yaml" if multi else "best.yaml"
            atomic_write_text(exp_dir / name, experiment_yaml(t, params, groups, study.study_name))
            names.append(f"experiment/{name}")
        summary["files"]["experiments"] = names
        if multi:
            if len(study.directions) in (2, 3) and _plot(ovm.plot_pareto_front, sweep_dir / "pareto_front.png",
                                                         study, target_names=list(objective_names)):
                plots["pareto_front"] = "pareto_front.png"
        else:
            if _plot(ovm.plot_optimization_history, sweep_dir / "history.png", study):
                plots["history"] = "history.png"
    if not multi:
        searched = {k for t in complete for k in t.distributions}
        if len(complete) >= 2 and searched:
            if _plot(ovm.plot_param_importances, sweep_dir / "importance.png", study):
                plots["importance"] = "importance.png"
        else:
            log.info("parameter importance needs at least 2 complete trials (have %d); importance.png not drawn",
                     len(complete))
    summary["files"]["plots"] = plots
    if complete:
        atomic_write_text(sweep_dir / "optimization_results.yaml", optimization_results(study, params))
        summary["files"]["results"] = "optimization_results.yaml"
    atomic_write_json(sweep_dir / "sweep_summary.json", json.loads(json.dumps(summary, default=str)))
    return summary


def optimization_results(study: optuna.Study, params: Sequence[Param]) -> str:
    """hydra-optuna-sweeper's `optimization_results.yaml` (its keys and layout; list-valued choices as lists)."""
    by_key = {p.key: p for p in params}

    def values(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
        return {k: by_key[k].python_value(v) if k in by_key else v for k, v in trial.params.items()}

    if len(study.directions) > 1:
        body: dict[str, Any] = {"name": "optuna", "solutions": [{"params": values(t), "values": list(t.values)}
                                                                for t in study.best_trials]}
    else:
        best = study.best_trial
        body = {"name": "optuna", "best_params": values(best), "best_value": best.value}
    return yaml.safe_dump(json.loads(json.dumps(body, default=str)), sort_keys=False)
