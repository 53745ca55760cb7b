"""Trials whose worker died: failed by the next worker that looks, with the reason recorded on the trial.

A worker (a sweeper process) records a heartbeat for each trial it runs. When the worker is killed, its
machine goes down or it loses the study database, the heartbeat stops and the next worker's
`optuna.storages.fail_stale_trials` marks the trial FAIL. Optuna records no reason, so the study showed a
FAIL nobody could explain. `StaleTrialRecorder` (the storage's stale-trial callback) writes it onto the
trial: `reason`, `error` (one sentence), the dead worker's `worker_host` / `worker_pid` (from the `worker`
attribute the sweeper sets when the trial starts) and `failed_by` (the worker that noticed).

Optuna calls the callback after the trial is FAIL, and a finished trial refuses new attributes
(`BaseStorage.check_trial_is_updatable`); `SweepStorage` lets the callback alone, for the one trial it
was handed, write them. A retry (`hydra.sweeper.retry_failed`) is enqueued first, so the retried trial does
not inherit the failed attempt's reason.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger("segplat.sweep")

HEARTBEAT_LOST = "heartbeat lost"


def this_worker() -> str:
    """`host:pid` of this process, as the sweeper records it on the trials it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


class SweepStorage(optuna.storages.RDBStorage):
    """An RDBStorage whose stale-trial callback may annotate the trial it has just failed (and nothing else)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._annotating = threading.local()

    def check_trial_is_updatable(self, trial_id: int, trial_state: TrialState) -> None:
        if getattr(self._annotating, "trial_id", None) == trial_id and trial_state == TrialState.FAIL:
            return
        super().check_trial_is_updatable(trial_id, trial_state)

    def annotate_failed(self, trial_id: int, attrs: dict[str, Any]) -> None:
        self._annotating.trial_id = trial_id
        try:
            for key, value in attrs.items():
                self.set_trial_user_attr(trial_id, key, value)
        finally:
            self._annotating.trial_id = None


class StaleTrialRecorder:
    """The storage's `heartbeat_stale_trial_callback`: retry (when asked), then record why the trial failed."""

    def __init__(self, grace_seconds: float, retry: Callable[[optuna.Study, FrozenTrial], None] | None = None) -> None:
        self.grace_seconds = grace_seconds
        self.retry = retry
        self.storage: SweepStorage | None = None  # set by make_storage once the storage exists

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self.retry is not None:
            self.retry(study, trial)
        worker = str(trial.user_attrs.get("worker", ""))
        host, _, pid = worker.rpartition(":")
        me = this_worker()
        attrs: dict[str, Any] = {
            "reason": HEARTBEAT_LOST,
            "error": (f"{HEARTBEAT_LOST}: its worker {worker or '(unknown: it died before recording itself)'} sent "
                      f"no heartbeat for over {self.grace_seconds:g} s (killed, its machine down, or cut off from the "
                      f"study database); failed by worker {me}"),
            "failed_by": me,
        }
        if host and pid.isdigit():
            attrs.update(worker_host=host, worker_pid=int(pid))
        log.warning("trial %d FAILED: %s", trial.number, attrs["error"])
        if self.storage is None:
            return
        try:
            tid = self.storage.get_trial_id_from_study_id_trial_number(
                self.storage.get_study_id_from_name(study.study_name), trial.number)
            self.storage.annotate_failed(tid, attrs)
        except Exception as err:  # the reason is a courtesy: never let it stop the worker that noticed
            log.warning("could not record why trial %d failed (%s)", trial.number, err)
