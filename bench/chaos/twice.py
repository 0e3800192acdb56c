"""``python -m bench.chaos.twice worker``: a worker that sees every JetStream message twice.

The chaos campaign's launcher, as ``tests.crashpoint`` is the crash tests'. It replaces the
first acknowledgement of each message (``num_delivered == 1``) with an immediate ``nak``, so
JetStream delivers the message again and the handlers run twice on it: what a worker crash
after the work and before the ack does, on every message. The second delivery is acked as
usual. Then it runs ``cascade-gateway`` with the given arguments in this process. Nothing in
the product can do this: the patch exists only in this launcher.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from nats.aio.msg import Msg

from gateway.cli import main as cascade_gateway

_ack = Msg.ack


async def _ack_the_second_time(msg: Msg) -> None:
    if msg.metadata.num_delivered == 1:
        await msg.nak()
        return
    await _ack(msg)


def main(argv: Sequence[str] | None = None) -> int:
    Msg.ack = _ack_the_second_time  # type: ignore[method-assign,assignment]
    return cascade_gateway(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
