"""The dev stack's record: read only while its supervisor lives, never over the caller's env."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
