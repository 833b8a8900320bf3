"""quart_sse.client: talk to a quart-sse service over HTTP only (httpx; no Redis, no Quart).

- `Publisher(base_url, token)` / `AsyncPublisher`: `publish(app, user, type, data, id=None)` and
  `broadcast(app, type, data, id=None)`, each returning the event id, and `publish_batch(app, [BatchEvent])`;
  ServiceError carries the service's JSON error.
- `subscribe(base_url, get_token, last_event_id=None, ...)`: an async iterator over a user's stream that reconnects
  and resumes by itself.

The rules both follow, and the browser client's, are in docs/clients.md.
"""

from __future__ import annotations

from .errors import ClientError, NoCredentials, ServiceError
from .publisher import AsyncPublisher, BatchEvent, BatchResult, Publisher
from .retry import CloseReason, WaitReason
from .subscriber import Event, State, Status, Subscription, subscribe

__all__ = ["AsyncPublisher", "BatchEvent", "BatchResult", "ClientError", "CloseReason", "Event", "NoCredentials",
           "Publisher", "ServiceError", "State", "Status", "Subscription", "WaitReason", "subscribe"]
