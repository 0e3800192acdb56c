"""Dead-letter operations: list what failed and why; replay after a fix.

``cascade-gateway dlq list`` prints one JSON object per dead letter (when there is none, one
line on stderr says the DLQ is empty), with its ``reason``
(``retries_exhausted``, ``unreadable_message``, ``illegal_transition``: see
:class:`contracts.messages.DeadLetter`), ``error``, and the ``withdrawal_id`` and ``task_id``
the message was about (empty when unknown). ``dlq replay`` publishes each one back
to its original subject and deletes it from the DLQ stream; handlers are idempotent, so
replaying something that was already handled changes nothing.
"""

from __future__ import annotations

import sys

import msgspec

from contracts.messages import DeadLetter
from gateway.settings import Settings
from orchestrator import bus


async def _read(settings: Settings, limit: int) -> list[tuple[int, DeadLetter]]:
    assert settings.nats_url is not None
    nc = await bus.connect(settings.nats_url, name="dlq-cli")
    js = nc.jetstream()
    names = bus.Names(settings.nats_namespace)
    letters: list[tuple[int, DeadLetter]] = []
    try:
        info = await js.stream_info(names.dlq_stream)
        seq = info.state.first_seq
        while seq <= info.state.last_seq and len(letters) < limit:
            try:
                raw = await js.get_msg(names.dlq_stream, seq)
            except Exception:  # noqa: BLE001 — deleted sequence numbers are gaps, skip them
                seq += 1
                continue
            letters.append((seq, msgspec.json.decode(raw.data or b"", type=DeadLetter)))
            seq += 1
    finally:
        await nc.close()
    return letters


async def list_dead_letters(settings: Settings) -> int:
    letters = await _read(settings, 100_000)
    for seq, letter in letters:
        print(msgspec.json.encode({"seq": seq, **msgspec.to_builtins(letter)}).decode())  # noqa: T201
    if not letters:
        # On stderr: stdout stays JSON lines only (empty here), for scripts that parse it.
        names = bus.Names(settings.nats_namespace)
        print(f"the DLQ ({names.dlq_stream}) is empty", file=sys.stderr)  # noqa: T201
    return 0


async def replay_dead_letters(settings: Settings, *, limit: int) -> int:
    assert settings.nats_url is not None
    letters = await _read(settings, limit)
    nc = await bus.connect(settings.nats_url, name="dlq-replay")
    js = nc.jetstream()
    names = bus.Names(settings.nats_namespace)
    try:
        for seq, letter in letters:
            await js.publish(
                names.subject(letter.subject),
                letter.payload.encode(),
                headers={"Nats-Msg-Id": f"replay-{seq}-{letter.failed_at}"},
            )
            await js.delete_msg(names.dlq_stream, seq)
    finally:
        await nc.close()
    print(f"replayed {len(letters)} message(s)")  # noqa: T201
    return 0
