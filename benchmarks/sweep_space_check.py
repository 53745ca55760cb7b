"""Wall time of the search-space check the sweeper runs before its first trial, for every shipped sweep.

    python -m benchmarks.sweep_space_check            # every conf/sweep/*.yaml; writes results/sweep_space_check.md

Each sweep is checked as `python -m segplat.train --multirun sweep=NAME` checks it (segplat.sweep.validate.
SpaceChecker on the configs Hydra composes, judged by the train task's own check_config), with the fixed overrides a
user must give (`dataset.root` for the Sen1Floods11 sweep). Goal (issue 31): under 10 s per sweep on an idle 2-core
machine. Composition of the first config (Hydra start-up) is outside the timed part, as it is in a sweep's log.
"""

from __future__ import annotations

import sys
import time

from benchmarks.common import CONF_DIR, RESULTS, machine_line

FIXED = {"sen1floods11_gfm": ["dataset.root=/nonexistent/sen1floods11"]}


def check(name: str) -> tuple[float, int, int, bool]:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from segplat.config import register_resolvers
    from segplat.sweep.space import parse_params
    from segplat.sweep.validate import SpaceChecker

    register_resolvers()
    fixed = [f"sweep={name}", *FIXED.get(name, [])]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        def compose_fn(overrides):
            return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)

        sweeper = compose_fn(fixed).hydra.sweeper
        params = parse_params(dict(sweeper.params))
        baselines = OmegaConf.to_container(sweeper.baselines) if sweeper.get("baselines") else []
        start = time.perf_counter()
        checker = SpaceChecker(params, fixed, compose_fn,
                               group_options=lambda g: GlobalHydra.instance().config_loader().get_group_options(g))
        checker.run(baselines)
        seconds = time.perf_counter() - start
    return seconds, checker.report.draws, checker.report.compositions, checker.report.exhaustive


def main() -> None:
    names = sys.argv[1:] or sorted(p.stem for p in (CONF_DIR / "sweep").glob("*.yaml"))
    rows = []
    for name in names:
        seconds, draws, compositions, exhaustive = check(name)
        rows.append(f"| {name} | {draws} | {compositions} | {'yes' if exhaustive else 'no'} | {seconds:.1f} |")
        print(rows[-1], flush=True)
    text = ("# Search-space check before the first trial\n\n`python -m benchmarks.sweep_space_check`\n\n"
            f"{machine_line()}\n\n| sweep | draws checked | compositions | exhaustive | seconds |\n"
            "| --- | --- | --- | --- | --- |\n" + "\n".join(rows) + "\n")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sweep_space_check.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
