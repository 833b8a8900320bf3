"""Presence: who is online per app, and signed webhooks when that changes, exactly once per change across the
cluster (docs/presence.md).

- `model`: the event a receiver gets (pure);
- `webhooks`: targets, signature, outcome of an answer, backoff (pure);
- `scripts`: the Lua that decides every change atomically in the app's Redis slot;
- `state`: the presence state, in Redis or in-process, and its sweep;
- `outbox`: the durable webhook queue with per-user leases;
- `delivery`: signed HTTP posts with retries;
- `sweeper`: every instance's loop;
- `service`: all of it assembled (`Presence`), and what the registry tells it.

Nothing is imported here: quart_sse.settings uses `webhooks` while `service` needs the settings.
"""
