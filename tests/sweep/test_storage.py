"""Study databases that cannot be used give one sentence each, with the place named and the password hidden
(SQLite files and URLs here; a real PostgreSQL server's refusals in test_postgres.py)."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from segplat.errors import ConfigError
from segplat.messages import redact
from segplat.sweep.study import make_storage

SECRET = "s3cr:t/p@ss"  # unescaped ':', '/' and '@': a malformed URL must still hide all of it


def refusal(url: str) -> str:
    with pytest.raises(ConfigError) as err:
        make_storage(url)
    text = str(err.value)
    assert SECRET not in text and "s3cr" not in text and len(text.splitlines()) == 1, text
    return text


def test_redact_hides_the_whole_password() -> None:
    assert redact(f"postgresql+psycopg2://me:{SECRET}@db.example:5433/optuna") == \
        "postgresql+psycopg2://me:***@db.example:5433/optuna"
    assert redact("sqlite:////tmp/a.db") == "sqlite:////tmp/a.db"
    assert redact("postgresql://me@host/db") == "postgresql://me@host/db"


@pytest.mark.parametrize(("url", "message"), [
    ("no url at all", r"storage=no url at all is not a database URL SQLAlchemy can read"),
    (f"postgresql://me:{SECRET}@host:port/db", r"storage=postgresql://me:\*\*\*@host:port/db is not a database URL"),
    ("postgres://me:x@host/db", r"names a database kind SQLAlchemy does not know"),
])
def test_malformed_urls(url: str, message: str) -> None:
    assert re.search(message, refusal(url))


def test_sqlite_files_that_cannot_be_used(tmp_path: Path) -> None:
    text = refusal(f"sqlite:///{tmp_path}/missing/folder/study.db")
    assert f"the SQLite study file {tmp_path}/missing/folder/study.db cannot be opened" in text
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not an SQLite file" * 200)
    assert f"the SQLite study file {junk} is not an SQLite database" in refusal(f"sqlite:///{junk}")


def test_a_server_that_does_not_answer() -> None:
    pytest.importorskip("psycopg2")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    text = refusal(f"postgresql+psycopg2://me:{SECRET.replace('/', '%2F').replace('@', '%40')}@127.0.0.1:{port}/db")
    assert f"the postgresql study database at 127.0.0.1:{port} cannot be reached" in text
