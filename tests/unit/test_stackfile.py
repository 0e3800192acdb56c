"""The dev stack's record: read only while its supervisor lives, never over the caller's env."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import stackfile

RECORDED = {"DATABASE_URL": "postgresql://postgres:secret@127.0.0.1:5999/cascade"}


def test_a_live_stack_completes_an_empty_environment(tmp_path: Path) -> None:
    stackfile.write(tmp_path, {**RECORDED, "UNRELATED": "x"})
    env, source = stackfile.with_running_stack({"DATA_DIR": str(tmp_path), "NATS_URL": ""})
    assert source == tmp_path / "stack.json"
    assert env["DATABASE_URL"] == RECORDED["DATABASE_URL"]
    assert "UNRELATED" not in env
    assert (tmp_path / "stack.json").stat().st_mode & 0o077 == 0


def test_the_callers_own_database_wins(tmp_path: Path) -> None:
    stackfile.write(tmp_path, RECORDED)
    mine = {"DATA_DIR": str(tmp_path), "DATABASE_URL": "postgresql://elsewhere/db"}
    env, source = stackfile.with_running_stack(mine)
    assert source is None
    assert env == mine


def test_a_record_left_by_a_dead_supervisor_is_ignored(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    (tmp_path / "stack.json").write_text(json.dumps({"pid": int(dead.stdout), "env": RECORDED}))
    assert stackfile.running_stack({"DATA_DIR": str(tmp_path)}) is None


def test_remove_deletes_only_its_own_record(tmp_path: Path) -> None:
    (tmp_path / "stack.json").write_text(json.dumps({"pid": 1, "env": RECORDED}))
    stackfile.remove(tmp_path)
    assert (tmp_path / "stack.json").exists()
    stackfile.write(tmp_path, RECORDED)
    stackfile.remove(tmp_path)
    assert not (tmp_path / "stack.json").exists()


def test_passwords_are_redacted() -> None:
    assert stackfile.redact_dsn(RECORDED["DATABASE_URL"]) == (
        "postgresql://postgres:***@127.0.0.1:5999/cascade"
    )
    assert stackfile.redact_dsn("postgresql://h/db") == "postgresql://h/db"


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("postgresql://u@h/db?password=s3cret", "postgresql://u@h/db?password=***"),
        (
            "postgresql://u:pw@h/db?sslmode=require&PassWord=s3cret",
            "postgresql://u:***@h/db?sslmode=require&PassWord=***",
        ),
        ("postgresql://u@h/db?sslmode=require", "postgresql://u@h/db?sslmode=require"),
    ],
)
def test_a_password_in_the_query_string_is_redacted(dsn: str, shown: str) -> None:
    assert stackfile.redact_dsn(dsn) == shown


_WATCHED: list[Path] = []
_MODES: list[int] = []


def _watch(event: str, args: tuple[object, ...]) -> None:
    """The temporary record's mode whenever it is chmod-ed or renamed: what another user could
    have opened it with until then."""
    if event in ("os.chmod", "os.rename") and _WATCHED and str(args[0]) == str(_WATCHED[0]):
        _MODES.append(os.lstat(_WATCHED[0]).st_mode)


sys.addaudithook(_watch)


def test_the_record_is_owner_only_from_its_first_byte(tmp_path: Path) -> None:
    _WATCHED[:] = [tmp_path / "stack.tmp"]
    _MODES.clear()
    umask = os.umask(0o022)
    try:
        stackfile.write(tmp_path, RECORDED)
    finally:
        os.umask(umask)
        _WATCHED.clear()
    assert _MODES, "the record was never renamed into place"
    assert all(stat.S_IMODE(mode) == 0o600 for mode in _MODES), [oct(m) for m in _MODES]


def test_a_planted_temporary_file_or_symlink_is_never_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("mine\n")
    victim.chmod(0o644)
    (tmp_path / "stack.tmp").symlink_to(victim)
    stackfile.write(tmp_path, RECORDED)
    assert (victim.read_text(), stat.S_IMODE(victim.stat().st_mode)) == ("mine\n", 0o644)
    record = tmp_path / "stack.json"
    assert not record.is_symlink()
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    assert json.loads(record.read_text())["env"] == RECORDED
    (tmp_path / "stack.tmp").write_text("left by a crash")
    (tmp_path / "stack.tmp").chmod(0o666)
    stackfile.write(tmp_path, RECORDED)
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    assert not (tmp_path / "stack.tmp").exists()


def test_a_record_of_another_user_is_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stackfile.write(tmp_path, RECORDED)  # this process plays a live stack
    record = tmp_path / "stack.json"
    assert stackfile.running_stack({"DATA_DIR": str(tmp_path)}) is not None
    if os.getuid() == 0:
        os.chown(record, 65534, 65534)
    else:  # a file of another user cannot be made: be another user
        monkeypatch.setattr(os, "getuid", lambda: record.stat().st_uid + 1)
    assert stackfile.running_stack({"DATA_DIR": str(tmp_path)}) is None
    env, source = stackfile.with_running_stack({"DATA_DIR": str(tmp_path)})
    assert (source, env.get("DATABASE_URL")) == (None, None)


def test_unleash_url_is_recorded_for_flags_but_not_lent_to_other_commands(
    tmp_path: Path,
) -> None:
    stackfile.write(
        tmp_path,
        {**RECORDED, "UNLEASH_URL": "http://unleash:4242/api", "UNLEASH_API_TOKEN": "t.secret"},
    )
    found = stackfile.running_stack({"DATA_DIR": str(tmp_path)})
    assert found is not None
    assert found[1]["UNLEASH_URL"] == "http://unleash:4242/api"
    assert "t.secret" not in (tmp_path / "stack.json").read_text()
    # `report` given UNLEASH_URL without its token would refuse its settings.
    env, _ = stackfile.with_running_stack({"DATA_DIR": str(tmp_path)})
    assert env["DATABASE_URL"] == RECORDED["DATABASE_URL"]
    assert "UNLEASH_URL" not in env
