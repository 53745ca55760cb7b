"""Two sweep workers share one study in a real PostgreSQL server (the multi-machine set-up).

The test starts a throwaway server (initdb + pg_ctl on a free port, in a temp dir) when PostgreSQL's
server binaries are installed (Debian: `apt-get install postgresql`; `.ci/run` installs them) and
skips otherwise.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.sweep.test_sweeper import command, root  # noqa: F401 - the module fixture `root` is reused

pytestmark = pytest.mark.slow


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    pg = _pg_bin()
    if pg is None:
        pytest.skip("PostgreSQL server binaries are not installed (apt-get install postgresql)")
    pytest.importorskip("psycopg2")
    # not under pytest's base temp dir: that one is private to this user, and the server may run as postgres
    data = Path(tempfile.mkdtemp(prefix="segplat-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: run the server as the postgres user
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root without a postgres user")
        shutil.chown(data, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    subprocess.run([*run_as, str(pg / "initdb"), "-D", str(data), "-U", "segplat", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    subprocess.run([*run_as, str(pg / "pg_ctl"), "-D", str(data), "-l", str(data / "server.log"), "-w", "-o",
                    f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    try:
        subprocess.run([str(pg / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "segplat", "optuna"],
                       check=True, capture_output=True)
        yield f"postgresql+psycopg2://segplat@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run([*run_as, str(pg / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


def test_two_workers_share_a_postgres_study(root: Path, tmp_path: Path, postgres_url: str) -> None:  # noqa: F811
    sweep_dir = tmp_path / "pg"
    cmd = command(root, "tiny", sweep_dir, "hydra.sweeper.study_name=pg", "hydra.sweeper.n_trials=4",
                  "hydra.sweeper.sampler.name=random", f"hydra.sweeper.storage={postgres_url}")
    procs = []
    for _ in range(2):
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        time.sleep(0.5)
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    study = optuna.load_study(study_name="pg", storage=postgres_url)
    trials = [t for t in study.trials if t.state != TrialState.WAITING]
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted(t.number for t in trials) == list(range(4))
    assert not (sweep_dir / "study.db").exists(), "the study must live in PostgreSQL, not in a SQLite file"
    assert "postgresql" in (sweep_dir / "sweep_summary.json").read_text()
