"""``cascade-gateway flags`` on a flags file, read back by the router's real Unleash client."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from flags import stores
from flags.admin import Edit, FlagsEditError, Plan, plan_allow, plan_kill
from flags.router import CohortRouter, load_flags_file
from flags.stores import FlagsFile
from gateway import stackfile
from gateway.cli import main
from gateway.flagcmd import _unleash_scope, _Usage
from gateway.settings import DEFAULT_FLAGS_FILE
from tests.conftest import flags_document
from tests.waiting import wait_until

WHEN = (
    "New withdrawals see it within 5 s (the gateway re-reads FLAGS_FILE every"
    " UNLEASH_REFRESH_SECONDS); withdrawals already created keep their cohort."
)


@pytest.fixture
def flags_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A flags file as FLAGS_FILE, with a second toggle the command must leave alone."""
    document = flags_document(enabled=True, merchants=["m_a"])
    document["features"].append({"name": "other.toggle", "enabled": True, "strategies": []})
    path = tmp_path / "flags.json"
    path.write_text(json.dumps(document))
    path.chmod(0o640)
    for name in ("UNLEASH_URL", "UNLEASH_ADMIN_TOKEN", "UNLEASH_REFRESH_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FLAGS_FILE", str(path))
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))  # no running make run stack
    return path


@pytest.fixture
def routers() -> Iterator[list[CohortRouter]]:
    started: list[CohortRouter] = []
    yield started
    for router in started:
        router.close()


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], list[str]]:
    status = main(["flags", *argv])
    captured = capsys.readouterr()
    return status, captured.out.splitlines(), captured.err.splitlines()


def test_show(flags_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = _run(capsys, "show")
    assert (status, err) == (0, [])
    assert out == [
        f"withdrawals.cascade in FLAGS_FILE {flags_file}",
        "  kill switch: off (toggle enabled)",
        "  allow-list: m_a",
        "  rollout: none",
        "  strategy 1: default, allow-list of 1 merchant(s)",
    ]
    status, out, _ = _run(capsys, "show", "--json")
    shown = json.loads("\n".join(out))
    assert shown["where"] == f"FLAGS_FILE {flags_file}"
    assert (shown["kill_switch"], shown["allow_list"], shown["rollout"]) == ("off", ["m_a"], None)


def test_allow_rewrites_the_file_whole_and_the_client_routes_by_it(
    flags_file: Path, capsys: pytest.CaptureFixture[str], routers: list[CohortRouter]
) -> None:
    status, out, err = _run(capsys, "allow", "m_x")
    assert (status, err) == (0, [])
    assert out == [
        f"withdrawals.cascade in FLAGS_FILE {flags_file}",
        "  allow-list: m_a → m_a, m_x",
        WHEN,
    ]
    document = load_flags_file(flags_file)  # what the gateway checks
    assert document["features"][1] == {"name": "other.toggle", "enabled": True, "strategies": []}
    assert flags_file.stat().st_mode & 0o777 == 0o640
    # No temporary file left; the lock file beside it stays (removing it would race).
    assert sorted(p.name for p in flags_file.parent.iterdir()) == ["flags.json", "flags.json.lock"]
    router = CohortRouter(flags_file=flags_file)
    router.start()
    routers.append(router)
    decision = router.decide("m_x")
    assert (decision.cohort, decision.reason) == ("cascade", "allow_list")

    status, out, _ = _run(capsys, "allow", "m_x")
    assert (status, out[1:]) == (0, ["  nothing changed: m_x is already on the allow-list"])


async def test_a_running_router_follows_each_move_within_its_refresh(
    flags_file: Path, routers: list[CohortRouter]
) -> None:
    router = CohortRouter(flags_file=flags_file, refresh_interval=1)
    await asyncio.to_thread(router.start)
    routers.append(router)

    async def move(*argv: str) -> None:
        assert await asyncio.to_thread(main, ["flags", *argv]) == 0

    async def routed(merchant: str, cohort: str, reason: str) -> None:
        await wait_until(
            lambda: router.decide(merchant),
            done=lambda d: (d.cohort, d.reason) == (cohort, reason),
            timeout=10,
            what=f"{merchant} to route {cohort} ({reason})",
        )

    await move("allow", "m_x")
    await routed("m_x", "cascade", "allow_list")
    await move("rollout", "100")
    await routed("m_nobody", "cascade", "rollout")
    await move("kill", "on")
    await routed("m_x", "legacy", "disabled")
    await move("kill", "off")
    await move("rollout", "0")
    await routed("m_nobody", "legacy", "not_targeted")
    await move("disallow", "m_x")
    await routed("m_x", "legacy", "not_targeted")
    assert router.decide("m_a").cohort == "cascade"
    assert router.describe()["file_error"] is None


def test_each_change_prints_before_and_after(
    flags_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(capsys, "rollout", "10%")[1][1:] == [
        "  rollout: none → 10 % of merchants (stickiness merchantId)",
        WHEN,
    ]
    assert _run(capsys, "kill", "on")[1][1:] == [
        "  kill switch: off (toggle enabled) → on (every new withdrawal goes legacy)",
        WHEN,
    ]
    assert _run(capsys, "disallow", "m_a")[1][1:] == [
        "  allow-list: m_a → nobody",
        "  note: m_a may still be routed to the cascade by the other strategies",
        WHEN,
    ]


def test_the_last_strategy_gone_switches_the_toggle_off(
    flags_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = _run(capsys, "disallow", "m_a")
    assert status == 0
    assert out[1:3] == [
        "  kill switch: off (toggle enabled) → on (every new withdrawal goes legacy)",
        "  allow-list: m_a → nobody",
    ]
    assert load_flags_file(flags_file)["features"][0]["enabled"] is False
    status, out, err = _run(capsys, "kill", "off")
    assert (status, out) == (2, [])
    assert err == [
        "cascade-gateway: flags kill: the toggle has no strategy, and enabled without one it"
        " would send every merchant to the cascade: add merchants (flags allow) or a rollout"
        " (flags rollout) first"
    ]


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (
            ["rollout", "101"],
            "flags rollout: the rollout must be a whole percentage from 0 to 100, not '101'",
        ),
        (
            ["rollout", "-5"],
            "flags rollout: the rollout must be a whole percentage from 0 to 100, not '-5'",
        ),
        (["allow", ""], "flags allow: the merchant id is empty"),
        (["disallow", " "], "flags disallow: the merchant id is empty"),
        (
            ["allow", "m/x"],
            "flags allow: merchant id 'm/x' is not 1-64 letters, digits, '_' or '-'"
            " (the API's rule for merchant_id)",
        ),
        (["kill", "maybe"], "flags kill: the kill switch is on or off, not 'maybe'"),
    ],
)
def test_a_bad_argument_is_one_line_and_exit_2(
    flags_file: Path, capsys: pytest.CaptureFixture[str], argv: list[str], error: str
) -> None:
    before = flags_file.read_bytes()
    assert _run(capsys, *argv) == (2, [], [f"cascade-gateway: {error}"])
    assert flags_file.read_bytes() == before


@pytest.mark.parametrize(
    ("env", "error"),
    [
        (
            {"UNLEASH_URL": "http://127.0.0.1:1/api"},
            "UNLEASH_URL is set, so the gateway reads the toggle from Unleash: set"
            " UNLEASH_ADMIN_TOKEN (an admin API token) to show or change it there",
        ),
        ({"UNLEASH_ADMIN_TOKEN": "*:*.x"}, "UNLEASH_ADMIN_TOKEN is set but UNLEASH_URL is not"),
        (
            {"UNLEASH_URL": "unleash:4242", "UNLEASH_ADMIN_TOKEN": "*:*.x"},
            "UNLEASH_URL must start with http:// or https://, not 'unleash:4242'",
        ),
        (
            {"UNLEASH_URL": "http://u/api", "UNLEASH_ADMIN_TOKEN": "*:*.x"},
            "set UNLEASH_ENVIRONMENT to the Unleash environment the gateway reads"
            " (e.g. production), or UNLEASH_API_TOKEN to its client token",
        ),
        (
            {"UNLEASH_REFRESH_SECONDS": "0"},
            "UNLEASH_REFRESH_SECONDS must be a whole number from 1 to 3600, not '0'",
        ),
    ],
)
def test_an_unusable_environment_is_one_line_and_exit_2(
    flags_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    error: str,
) -> None:
    monkeypatch.delenv("UNLEASH_API_TOKEN", raising=False)
    monkeypatch.delenv("UNLEASH_ENVIRONMENT", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert _run(capsys, "show") == (2, [], [f"cascade-gateway: flags show: {error}"])


def _numeric_rollout() -> bytes:
    """The kill switch on by hand, the rollout a JSON number: the engine would ignore it."""
    document = flags_document(enabled=False, merchants=["m_a"], rollout=100)
    document["features"][0]["strategies"][1]["parameters"]["rollout"] = 100
    return json.dumps(document).encode()


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (b"{not json", "not valid JSON"),
        (
            json.dumps({"features": [{"name": "withdrawal.cascade", "enabled": True}]}).encode(),
            "no 'withdrawals.cascade' toggle",
        ),
        (
            json.dumps(flags_document(enabled=True, merchants=["m_a"]))
            .replace("m_a", "m_\xe9")
            .encode("latin-1"),
            "not UTF-8",
        ),
        (_numeric_rollout(), "not an Unleash features file (Expected `str`, got `int`"),
    ],
)
@pytest.mark.parametrize("command", [["show"], ["allow", "m_x"], ["kill", "off"]])
def test_a_bad_flags_file_is_one_line_and_left_alone(
    flags_file: Path,
    capsys: pytest.CaptureFixture[str],
    content: bytes,
    error: str,
    command: list[str],
) -> None:
    flags_file.write_bytes(content)
    status, out, err = _run(capsys, *command)
    assert (status, out, len(err)) == (2, [], 1)
    prefix = f"cascade-gateway: flags {command[0]}: FLAGS_FILE {flags_file}: {error}"
    assert err[0].startswith(prefix)
    assert flags_file.read_bytes() == content


async def test_an_edit_the_engine_would_ignore_is_not_written(flags_file: Path) -> None:
    store = FlagsFile(flags_file)
    toggle = await store.read()
    bad = {"name": "default", "parameters": {}, "constraints": [], "segments": [99]}
    before = flags_file.read_bytes()
    plan = Plan(edits=(Edit("add", strategy=bad),))
    with pytest.raises(FlagsEditError) as caught:
        await store.write(toggle, plan)
    assert str(caught.value).startswith(
        "nothing written: the edited file would be refused (FLAGS_FILE"
    )
    assert "the Unleash engine refuses it" in str(caught.value)
    assert flags_file.read_bytes() == before


def test_a_missing_flags_file_is_one_line(
    flags_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags_file.unlink()
    assert _run(capsys, "show") == (
        2,
        [],
        [
            f"cascade-gateway: flags show: FLAGS_FILE {flags_file}:"
            " cannot read (No such file or directory)"
        ],
    )


async def test_a_file_changed_while_the_command_ran_is_not_overwritten(flags_file: Path) -> None:
    store = FlagsFile(flags_file)
    toggle = await store.read()
    edited = json.dumps(flags_document(enabled=False))
    flags_file.write_text(edited)  # someone else's edit, between read and write
    with pytest.raises(FlagsEditError, match="changed while this command ran: nothing written"):
        await store.write(toggle, plan_allow(toggle, "m_x"))
    assert flags_file.read_text() == edited


def test_the_file_of_the_running_make_run_stack_else_the_default(
    flags_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLAGS_FILE")
    assert _run(capsys, "show")[1][0] == f"withdrawals.cascade in FLAGS_FILE {DEFAULT_FLAGS_FILE}"
    data = Path(os.environ["DATA_DIR"])
    data.mkdir()
    stackfile.write(data, {"FLAGS_FILE": str(flags_file)})  # this process plays the stack
    assert _run(capsys, "show")[1][0] == f"withdrawals.cascade in FLAGS_FILE {flags_file}"


async def test_two_concurrent_edits_never_lose_one(
    flags_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kill on and allow m_x read the same file; the kill's compare-and-rename is paused
    until the allow has either written or reached the lock: the allow must then be refused
    (or wait), never pass its compare and be undone by the kill's rename."""
    killer, allower = FlagsFile(flags_file), FlagsFile(flags_file)
    kill_read, allow_read = await killer.read(), await allower.read()
    arrived = threading.Event()  # the allow wrote, or waits for the lock
    outcome: list[BaseException | None] = []
    real_flock, real_replace = fcntl.flock, stores._replace_atomically

    def flock(descriptor: int, operation: int) -> None:
        if threading.current_thread().name == "allow" and operation & fcntl.LOCK_EX:
            arrived.set()
        real_flock(descriptor, operation)

    def allow() -> None:
        try:
            asyncio.run(allower.write(allow_read, plan_allow(allow_read, "m_x")))
            outcome.append(None)
        except FlagsEditError as exc:
            outcome.append(exc)
        finally:
            arrived.set()

    allow_thread = threading.Thread(target=allow, name="allow")

    def replace_when_the_allow_has_arrived(path: Path, content: bytes) -> None:
        if threading.current_thread() is not allow_thread:  # the kill, between compare and rename
            allow_thread.start()
            assert arrived.wait(timeout=30)
        real_replace(path, content)

    monkeypatch.setattr(fcntl, "flock", flock)
    monkeypatch.setattr(stores, "_replace_atomically", replace_when_the_allow_has_arrived)
    await killer.write(kill_read, plan_kill(kill_read, on=True))
    await asyncio.to_thread(allow_thread.join, 30)
    assert not allow_thread.is_alive()
    monkeypatch.undo()
    final = await FlagsFile(flags_file).read()
    assert final.enabled is False  # the kill switch held
    assert isinstance(outcome[0], FlagsEditError)
    assert "changed while this command ran: nothing written" in str(outcome[0])


async def test_the_rename_is_made_durable(
    flags_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[bool] = []
    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(descriptor).st_mode))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    store = FlagsFile(flags_file)
    toggle = await store.read()
    await store.write(toggle, plan_allow(toggle, "m_x"))
    assert synced == [False, True]  # the temporary file, then the directory after the rename


def test_a_make_run_stack_on_unleash_is_not_edited_through_its_file(
    flags_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = Path(os.environ["DATA_DIR"])
    data.mkdir()
    stack = {
        "FLAGS_FILE": str(flags_file),
        "UNLEASH_URL": "http://unleash:4242/api",
        "UNLEASH_API_TOKEN": "default:production.secret",
    }
    stackfile.write(data, stack)  # this process plays a stack run with UNLEASH_URL
    recorded = json.loads((data / "stack.json").read_text())["env"]
    assert recorded["UNLEASH_URL"] == "http://unleash:4242/api"
    assert "UNLEASH_API_TOKEN" not in recorded
    before = flags_file.read_bytes()
    error = (
        f"the make run stack recorded in {data / 'stack.json'} routes from Unleash at"
        f" http://unleash:4242/api, not from {flags_file}: set UNLEASH_URL and"
        " UNLEASH_ADMIN_TOKEN (an admin API token) to show or change the toggle there"
    )
    for argv in (["kill", "on"], ["show"]):
        assert _run(capsys, *argv) == (2, [], [f"cascade-gateway: flags {argv[0]}: {error}"])
        monkeypatch.delenv("FLAGS_FILE", raising=False)  # named, or found through the stack
    assert flags_file.read_bytes() == before
    # Another file than the stack's is the caller's business.
    other = flags_file.with_name("other.json")
    other.write_bytes(before)
    monkeypatch.setenv("FLAGS_FILE", str(other))
    assert _run(capsys, "kill", "on")[0] == 0


async def test_an_unleash_url_without_api_is_one_line_naming_the_api_root(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def page(request: web.Request) -> web.Response:
        return web.Response(text="<!DOCTYPE html><html><title>Unleash</title></html>")

    async def listing(request: web.Request) -> web.Response:
        return web.json_response(["not", "an", "object"])

    app = web.Application()
    app.router.add_get("/list/admin/projects/default/features/withdrawals.cascade", listing)
    app.router.add_get("/{tail:.*}", page)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        monkeypatch.setenv("UNLEASH_ADMIN_TOKEN", "*:*.admin")
        monkeypatch.setenv("UNLEASH_ENVIRONMENT", "production")
        html = "<!DOCTYPE html><html><title>Unleash</title></html>"
        for root, start in (("", html), ("/list", '["not", "an", "object"]')):
            url = str(server.make_url(root)).rstrip("/")
            monkeypatch.setenv("UNLEASH_URL", url)
            status = await asyncio.to_thread(main, ["flags", "show"])
            captured = capsys.readouterr()
            assert (status, captured.out) == (2, "")
            assert captured.err.splitlines() == [
                "cascade-gateway: flags show: Unleash GET"
                " /admin/projects/default/features/withdrawals.cascade answered with no JSON"
                f" object ({start!r}): UNLEASH_URL must be the API root, e.g."
                f" http://unleash:4242/api (it is {url})"
            ]
    finally:
        await server.close()


def test_the_refresh_interval_it_names_is_the_one_set(
    flags_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UNLEASH_REFRESH_SECONDS", "2")
    assert _run(capsys, "kill", "on")[1][-1].startswith("New withdrawals see it within 2 s ")


@pytest.mark.parametrize(
    ("env", "scope"),
    [
        ({"UNLEASH_API_TOKEN": "default:production.abc"}, ("default", "production")),
        ({"UNLEASH_API_TOKEN": "payments:staging.abc"}, ("payments", "staging")),
        ({"UNLEASH_API_TOKEN": "*:production.abc"}, ("default", "production")),
        (
            {"UNLEASH_API_TOKEN": "default:production.abc", "UNLEASH_ENVIRONMENT": "staging"},
            ("default", "staging"),
        ),
        ({"UNLEASH_PROJECT": "p", "UNLEASH_ENVIRONMENT": "e"}, ("p", "e")),
    ],
)
def test_the_unleash_scope_is_the_client_tokens_unless_set(
    env: dict[str, str], scope: tuple[str, str]
) -> None:
    assert _unleash_scope(env) == scope


@pytest.mark.parametrize("token", ["", "an-old-style-secret", "*:*.abc"])
def test_a_token_that_names_no_environment_needs_unleash_environment(token: str) -> None:
    with pytest.raises(_Usage, match="set UNLEASH_ENVIRONMENT"):
        _unleash_scope({"UNLEASH_API_TOKEN": token})
