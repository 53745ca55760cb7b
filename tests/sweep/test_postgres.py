"""Two sweep workers share one study in a real PostgreSQL server (the multi-machine set-up).

The test starts a throwaway server (initdb + pg_ctl on a free port, in a temp dir) when PostgreSQL's
server binaries are installed (Debian: `apt-get install postgresql`; `.ci/run` installs them) and
skips otherwise. TCP logins need a password (scram-sha-256), as on a shared server, so that a wrong
password is refused by the server itself.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
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

from segplat.errors import ConfigError
from segplat.sweep.study import make_storage
from tests.sweep.test_sweeper import command, root  # noqa: F401 - the module fixture `root` is reused

pytestmark = pytest.mark.slow
PASSWORD = "Pg-s3cret-42"


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
    pwfile = Path(tempfile.mkstemp(prefix="segplat-pg-pw-")[1])
    pwfile.write_text(PASSWORD + "\n")
    if run_as:
        shutil.chown(pwfile, user.pw_uid, user.pw_gid)
    subprocess.run([*run_as, str(pg / "initdb"), "-D", str(data), "-U", "segplat", "--auth-local=trust",
                    "--auth-host=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8"], check=True, capture_output=True)
    pwfile.unlink()
    subprocess.run([*run_as, str(pg / "pg_ctl"), "-D", str(data), "-l", str(data / "server.log"), "-w", "-o",
                    f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    try:
        subprocess.run([str(pg / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "segplat", "optuna"],
                       check=True, capture_output=True, env={**os.environ, "PGPASSWORD": PASSWORD})
        yield f"postgresql+psycopg2://segplat:{PASSWORD}@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run([*run_as, str(pg / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


def test_two_workers_share_a_postgres_study(root: Path, tmp_path: Path, postgres_url: str) -> None:  # noqa: F811
    sweep_dir = tmp_path / "pg"
    cmd = command(root, "tiny", sweep_dir, "hydra.sweeper.study_name=pg", "hydra.sweeper.n_trials=4",
                  "hydra/sweeper/sampler=random", f"hydra.sweeper.storage={postgres_url}")
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
    # the password reached the trials through the environment only: no file of the sweep holds it
    leaks = [str(f) for f in sweep_dir.rglob("*") if f.is_file() and PASSWORD.encode() in f.read_bytes()]
    assert not leaks, leaks


def test_the_server_refuses_in_one_sentence(postgres_url: str) -> None:
    port = re.search(r":(\d+)/", postgres_url).group(1)
    cases = {postgres_url.replace(PASSWORD, "wrong-one"): f"at 127.0.0.1:{port} refused the login",
             postgres_url.replace("/optuna", "/no_such_db"): f"at 127.0.0.1:{port} has no such database",
             postgres_url.replace(f":{port}/", f":{_free_port()}/"): "cannot be reached"}
    for url, message in cases.items():
        with pytest.raises(ConfigError) as err:
            make_storage(url)
        text = str(err.value)
        assert message in text and len(text.splitlines()) == 1, text
        assert PASSWORD not in text and "wrong-one" not in text


def test_cli_wrong_password_and_invalid_space_write_nothing(root: Path, tmp_path: Path,  # noqa: F811
                                                            postgres_url: str) -> None:
    sweep_dir = tmp_path / "nothing"
    port = re.search(r":(\d+)/", postgres_url).group(1)
    bad = command(root, "tiny", sweep_dir, "hydra.sweeper.study_name=refused",
                  f"hydra.sweeper.storage={postgres_url.replace(PASSWORD, 'wrong-one')}")
    res = subprocess.run(bad, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"127.0.0.1:{port} refused the login" in errors[0], res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "wrong-one" not in res.stdout + res.stderr
    # a misspelt parameter: refused before the database is touched, so the study does not exist
    typo = command(root, "tiny", sweep_dir, "hydra.sweeper.study_name=typo", f"hydra.sweeper.storage={postgres_url}",
                   "optimizer.weight_decayy=choice(0.0,0.1)")
    res = subprocess.run(typo, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "did you mean optimizer.weight_decay?" in res.stderr, res.stderr[-3000:]
    assert "typo" not in optuna.get_all_study_names(storage=postgres_url)
    assert not sweep_dir.exists()
