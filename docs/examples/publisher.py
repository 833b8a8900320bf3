"""Publish from Python straight to the service's Redis, with history, exactly as `POST /publish` does.

    REDIS_URL=redis://localhost:6379/0 python docs/examples/publisher.py my-app alice

Needs the quart_sse package: installed (`pip install -r requirements.txt .` from a checkout, or the wheel; README:
Install), or importable from the repository. And the same Redis as the service. Events reach every open stream of
the user on every instance, and a stream that reconnects with Last-Event-ID gets them from history, even if the
service was down when they were published.
"""

from __future__ import annotations

import asyncio
import os
import sys

from quart_sse.broker.base import BrokerUnavailable
from quart_sse.events import EventError
from quart_sse.publisher import connect


async def main(app: str, user: str) -> int:
    async with connect(os.environ.get("REDIS_URL", "redis://localhost:6379/0")) as pub:
        try:
            # to one user: every stream of `user` in `app`
            msg = await pub.publish(app, user, "notification", {"title": "Hello", "body": "from Python"})
            print(f"published {msg.id} to {app}/{user}")
            # user=None broadcasts to every stream of the app; an id of your own is kept as the event's id
            msg = await pub.publish(app, None, "announcement", {"text": "to everyone"}, event_id="announce-1")
            print(f"broadcast {msg.id} to {app}")
        except EventError as exc:  # a bad id, type or data: nothing was published
            print(f"refused: {exc}", file=sys.stderr)
            return 2
        except BrokerUnavailable as exc:  # Redis unreachable
            print(f"redis unavailable: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} APP USER")
    sys.exit(asyncio.run(main(sys.argv[1], sys.argv[2])))
