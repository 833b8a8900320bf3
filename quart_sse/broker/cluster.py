"""REDIS_CLUSTER=true: the Redis broker on a Redis Cluster, live traffic over sharded pub/sub (Redis 7+).

Why sharded: a classic PUBLISH is copied to every node of a cluster over the cluster bus, so fan-out traffic grows
with the node count; an SPUBLISH stays inside the shard that owns the channel's slot. Our live channel of a user or
of an app's broadcasts (`sse:{app}:live:...`) sits in the app's slot next to its history and sequence keys, so the
publish script still XADDs and SPUBLISHes atomically in one round trip (apps, not users, spread over shards).

The hub is unchanged: it (un)subscribes the seed's channel names (`{app}:channel:{user}`, `{app}:broadcast`). Each
maps to two physical channels: the sharded twin, carried by one link per primary (routed by slot), and the classic
name itself on one link to any node, so that the seed's raw `PUBLISH {app}:channel:{user}` keeps reaching streams
(a classic PUBLISH reaches every node). Our own publishes go to the sharded twin only, so nothing arrives twice.
A subscription is confirmed once both are. The control channel and reply channels are sharded too: an SPUBLISH
answers how many instances received it (every instance subscribes at the slot's owner), a classic PUBLISH in a
cluster counts only the subscribers of the node it ran on.

Slot ownership changes (failover, resharding) reach us as a dropped link, a server-sent `sunsubscribe` or a
`MOVED` answer. A reconciler then refreshes the slot map (on a client of its own, so that it never races the
commands in flight) and subscribes the channels at their new owners. Until they are confirmed there, their live
messages are kept back; then the same resync as after an outage runs (streams held, history read after the new
subscription, live copies merged in position order), so nothing that history holds is lost or sent twice.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import hiredis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

from .. import keys
from ..tasks import cancel_and_wait
from .base import OnControl, OnMessage, OnReconnect
from .pubsub import MessageCallback, PubSubLink, _Protocol
from .redis import PUBLISH_CALL, PUBLISH_LUA, REPLAY_LUA, RedisBroker
from .seen import MAX_SEEN_IDS

log = logging.getLogger("quart_sse.broker")

assert PUBLISH_LUA.count(PUBLISH_CALL) == 1, "the publish script changed: update its cluster variant"
#: The same script, publishing to the sharded channels (same slot as its keys: allowed inside a script). One call
#: carries a whole batch: every key and channel of one app shares the app's slot, hence one shard.
CLUSTER_PUBLISH_LUA = PUBLISH_LUA.replace(PUBLISH_CALL, PUBLISH_CALL.replace("'PUBLISH'", "'SPUBLISH'"))

#: How often the reconciler retries while a channel has no reachable owner (a failover takes about
#: cluster-node-timeout plus an election).
RETRY_INTERVAL = 0.2
#: How long a node that dropped or refused a channel is not believed when the slot map still names it as the
#: owner (nodes learn of a failover at slightly different times); after that, it may own the slot again.
STALE_MAP_GRACE = 5.0
#: Live messages kept back per channel while it moves; older ones are dropped (the resync reads them from history).
MAX_HELD = 10_000


def sharded_twin(channel: str) -> str | None:
    """The sharded channel carrying our publishes for a seed channel name; None for a name that is not one."""
    parts = channel.split(":")  # ids cannot contain ':' (ids.py)
    if len(parts) == 3 and parts[1] == "channel":
        return keys.sharded_user_channel(parts[0], parts[2])
    if len(parts) == 2 and parts[1] == "broadcast":
        return keys.sharded_broadcast_channel(parts[0])
    return None


def node_url(base: str, host: str, port: int) -> str:
    """`base` (scheme, credentials) pointed at another node of the cluster."""
    u = urlsplit(base)
    userinfo = u.netloc.rpartition("@")[0]
    hostport = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return urlunsplit((u.scheme, f"{userinfo}@{hostport}" if userinfo else hostport, "", "", ""))


# ---------------------------------------------------------------------------------------------------- commands
_ASYNCIO_DIR = os.path.dirname(asyncio.__file__)


def _connection_glitch(exc: BaseException) -> bool:
    """An AttributeError/TypeError raised inside redis-py or asyncio's transports: a connection torn down under a
    command (redis/redis-py#4287, and slot-map refreshes racing commands during a failover), not a bug of ours."""
    if not isinstance(exc, AttributeError | TypeError):
        return False
    tb, last = exc.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    if last is None:
        return False
    where = last.tb_frame.f_code.co_filename
    return f"{os.sep}redis{os.sep}" in where or where.startswith(_ASYNCIO_DIR)


def _unavailable(exc: Exception) -> RedisConnectionError:
    """redis-py raises RedisClusterException (not a RedisError) when no node answers or a slot has no owner: for
    the service that is Redis being unreachable (503, retry), like any connection error."""
    return RedisConnectionError(f"redis cluster: {type(exc).__name__}: {exc}")


class _ClusterPipeline(ClusterPipeline):
    async def execute(self, *args: Any, **kwargs: Any) -> list[Any]:
        try:
            return await super().execute(*args, **kwargs)
        except (RedisClusterException, AttributeError, TypeError) as exc:
            if isinstance(exc, RedisClusterException) or _connection_glitch(exc):
                raise _unavailable(exc) from exc
            raise


class ClusterClient(RedisCluster):
    """RedisCluster whose 'cluster unreachable' errors are RedisErrors, as the registry and tickets expect."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except (RedisClusterException, AttributeError, TypeError) as exc:
            if isinstance(exc, RedisClusterException) or _connection_glitch(exc):
                raise _unavailable(exc) from exc
            raise

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        if shard_hint:
            raise RedisClusterException("shard_hint is deprecated in cluster mode")
        return _ClusterPipeline(self, transaction)  # type: ignore[abstract]


# ---------------------------------------------------------------------------------------------------- pub/sub links
class ShardLink(PubSubLink):
    """The sharded subscriptions held at one primary; reports channels the node stopped serving."""

    def __init__(self, node: str, url: str, on_message: MessageCallback, on_up: Callable[[], None],
                 on_down: Callable[[ShardLink], None], on_lost: Callable[[ShardLink, str], None]) -> None:
        super().__init__(url, on_message, self._connection_up, self._connection_down, sharded=True)
        self.node = node
        self._then_up = on_up
        self._then_down = on_down
        self._on_lost = on_lost
        self._own_unsubs: dict[str, int] = {}  # SUNSUBSCRIBEs we sent on this connection, not yet answered

    def unsubscribe(self, channel: str) -> None:
        if self.connected:
            self._own_unsubs[channel] = self._own_unsubs.get(channel, 0) + 1
        super().unsubscribe(channel)

    def forget(self, channel: str) -> None:
        """Drop `channel` without a command: the node no longer serves its slot (moved, failed over, gone)."""
        self.desired.discard(channel)
        for group in self._pending.pop(channel, ()):
            for fut in group:
                fut.cancel()

    def _connection_up(self) -> None:
        self._own_unsubs.clear()  # answers to SUNSUBSCRIBEs of a previous connection never come
        self._then_up()

    def _connection_down(self) -> None:
        self._then_down(self)

    def _handle(self, reply: Any) -> None:
        if type(reply) is list and len(reply) == 3:
            kind, raw = reply[0], reply[1]
            if kind == b"smessage":
                if raw.decode("utf-8", "replace") in self.desired:  # never a channel we moved elsewhere
                    self._on_message(raw, reply[2])
                return
            if kind == b"sunsubscribe":
                ch = raw.decode()
                n = self._own_unsubs.pop(ch, 0)
                if n > 1:
                    self._own_unsubs[ch] = n - 1
                elif n == 0 and ch in self.desired:  # not ours: the slot left this node
                    log.warning("redis node %s dropped sharded channel %s (slot moved)", self.node, ch[:200])
                    self._on_lost(self, ch)
                return
            if kind == b"ssubscribe" and raw.decode() not in self.desired:  # confirmed after we dropped it
                super()._handle(reply)
                ch = raw.decode()
                if self.connected and ch not in self._own_unsubs:
                    self.unsubscribe(ch)
                return
        elif isinstance(reply, hiredis.ReplyError):
            text = str(reply)
            if text.startswith(("MOVED ", "ASK ", "CLUSTERDOWN", "TRYAGAIN")):
                self._redirected(text)
                return
        super()._handle(reply)

    def _redirected(self, text: str) -> None:
        """A subscribe was refused: `MOVED <slot> <node>` names the slot; otherwise every unconfirmed channel."""
        log.info("redis node %s refused a subscription: %s", self.node, text[:200])
        parts = text.split()
        slot = int(parts[1]) if parts[0] in ("MOVED", "ASK") and len(parts) > 1 and parts[1].isdigit() else None
        for ch in list(self.desired):
            if (key_slot(ch.encode()) == slot) if slot is not None else (ch in self._pending):
                self._on_lost(self, ch)


class AnyNodeLink(PubSubLink):
    """Classic pub/sub on one node, any node: a classic PUBLISH reaches them all. Each (re)connection tries the
    configured node first, then the others the slot map knows, so it leaves a dead node at once."""

    def __init__(self, candidates: Callable[[], list[str]], on_message: MessageCallback,
                 on_up: Callable[[], None], on_down: Callable[[], None]) -> None:
        super().__init__(candidates()[0], on_message, on_up, on_down)
        self._candidates = candidates

    async def _connect(self) -> _Protocol:
        last: Exception = ConnectionError("no redis node known")
        for url in self._candidates():
            self._url = url
            try:
                return await super()._connect()
            except (OSError, TimeoutError) as exc:
                last = exc
        raise last


# ---------------------------------------------------------------------------------------------------- the broker
class RedisClusterBroker(RedisBroker):
    """History and scripts as RedisBroker (its replay/head are inherited), on a cluster client; live as above."""

    name = "redis-cluster"

    def __init__(self, url: str, instance: str, history_size: int, history_ttl: int,
                 *, max_seen_ids: int = MAX_SEEN_IDS) -> None:
        super().__init__(url, instance, history_size, history_ttl, max_seen_ids=max_seen_ids)
        self._single = self.redis  # the parent's single-node client: never used, closed with us
        self.cluster = ClusterClient.from_url(url, socket_connect_timeout=2, socket_timeout=5, max_connections=512)
        self.redis = self.cluster  # type: ignore[assignment]
        self._publish = self.cluster.register_script(CLUSTER_PUBLISH_LUA)
        self._replay = self.cluster.register_script(REPLAY_LUA)
        # the slot map the pub/sub links follow, refreshed by the reconciler only
        self._router = RedisCluster.from_url(url, socket_connect_timeout=2, socket_timeout=5)
        # nothing to resync when the classic link comes back: it carries raw PUBLISHes only, never in history
        self.link = AnyNodeLink(self._classic_candidates, self._received, self._noop, self._noop)
        self._links: dict[str, ShardLink] = {}  # node name -> its link
        self._where: dict[str, ShardLink] = {}  # sharded channel -> the link it is subscribed on
        self._desired: set[str] = set()  # sharded channels we want, control channels included
        self._logical: dict[str, str] = {}  # sharded channel -> the seed name the hub knows
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}  # unconfirmed hub subscriptions, per channel
        self._lost: set[str] = set()  # channels whose owner must be found again
        # channel -> (node that dropped or refused it, when): a slot map still naming that node is stale
        self._refused: dict[str, tuple[str, float]] = {}
        self._held: dict[str, list[tuple[bytes, bytes]]] = {}  # moving channels -> live messages kept back
        self._confirming: list[asyncio.Future[None]] = []  # (re)subscriptions made since the last stable state
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._initialized = False

    # -- lifecycle --------------------------------------------------------------------------------------------
    async def start(self, on_message: OnMessage, on_control: OnControl, on_reconnect: OnReconnect) -> None:
        self._on_message, self._on_control, self._on_reconnect = on_message, on_control, on_reconnect
        self._task = asyncio.get_running_loop().create_task(self._reconciler(), name="redis-cluster-routes")
        for ch in (keys.CONTROL_CHANNEL, self._reply):
            self._desired.add(ch)
            self._place(ch)
        self.link.start()

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        await self.link.close()
        for link in list(self._links.values()):
            await link.close()
        for waiters in self._waiters.values():
            for fut in waiters:
                fut.cancel()
        await self._publishes_sent()
        await self.cluster.aclose()
        await self._router.aclose()
        await self._single.aclose()
        await self._single.connection_pool.disconnect()

    async def ready(self) -> bool:
        if not self.link.connected or self._lost:
            return False
        for ch in self._desired:
            link = self._where.get(ch)
            if link is None or not link.connected:
                return False
        try:
            return bool(await self.cluster.ping(target_nodes=RedisCluster.PRIMARIES))
        except (RedisError, OSError):
            return False

    def _noop(self) -> None:
        pass

    def routes(self) -> dict[str, str]:
        """Sharded channel -> the node (host:port) it is subscribed at: what operators and tests inspect."""
        return {ch: link.node for ch, link in self._where.items()}

    @property
    def classic_node(self) -> str:
        """The node the classic link (raw seed PUBLISH) is on."""
        u = urlsplit(self.link._url)
        return f"{u.hostname}:{u.port}"

    def _classic_candidates(self) -> list[str]:
        """The configured node first, then every node the slot map knows, for the classic link."""
        urls = [self.url]
        for node in list(self._router.nodes_manager.nodes_cache.values()):
            u = node_url(self.url, node.host, int(node.port))
            if u not in urls:
                urls.append(u)
        return urls

    # -- live -------------------------------------------------------------------------------------------------
    def subscribe(self, channel: str) -> Awaitable[None]:
        waits: list[Awaitable[None]] = [self.link.subscribe(channel)]
        shard = sharded_twin(channel)
        if shard is not None:
            own: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(shard, []).append(own)
            own.add_done_callback(partial(self._settled, shard))
            self._logical[shard] = channel
            self._desired.add(shard)
            self._place(shard)
            waits.append(own)
        return cast(Awaitable[None], asyncio.gather(*waits))

    def unsubscribe(self, channel: str) -> None:
        self.link.unsubscribe(channel)
        shard = sharded_twin(channel)
        if shard is None:
            return
        self._desired.discard(shard)
        self._logical.pop(shard, None)
        self._lost.discard(shard)
        self._refused.pop(shard, None)
        self._held.pop(shard, None)
        for fut in self._waiters.pop(shard, []):
            fut.cancel()
        link = self._where.pop(shard, None)
        if link is not None:
            link.unsubscribe(shard)

    def _settled(self, shard: str, fut: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(shard)
        if waiters is not None and fut in waiters:
            waiters.remove(fut)
            if not waiters:
                del self._waiters[shard]

    def _received_shard(self, channel: bytes, payload: bytes) -> None:
        name = channel.decode("utf-8", "replace")
        held = self._held.get(name)
        if held is not None:  # moving: kept back until the resync is under way
            held.append((channel, payload))
            if len(held) > MAX_HELD:
                del held[0]  # the resync reads it from history
            return
        if name == keys.CONTROL_CHANNEL or name == self._reply:
            self._received(channel, payload)
            return
        logical = self._logical.get(name)
        if logical is not None:
            self._received(logical.encode(), payload)

    # -- routing ----------------------------------------------------------------------------------------------
    def _owner(self, channel: str) -> ClusterNode | None:
        try:
            return self._router.nodes_manager.get_node_from_slot(key_slot(channel.encode()))
        except (RedisClusterException, KeyError):
            return None

    def _link_for(self, node: ClusterNode) -> ShardLink:
        link = self._links.get(node.name)
        if link is None:
            link = ShardLink(node.name, node_url(self.url, node.host, int(node.port)), self._received_shard,
                             self._wake.set, self._shard_down, self._shard_lost)
            self._links[node.name] = link
            link.start()
        return link

    def _place(self, channel: str) -> None:
        """Subscribe `channel` at its owner now, or leave it to the reconciler when the owner is unknown."""
        node = self._owner(channel) if self._initialized else None
        if node is None:
            self._lost.add(channel)
            self._wake.set()
            return
        link = self._link_for(node)
        self._where[channel] = link
        self._confirm_with(channel, link.subscribe(channel))

    def _confirm_with(self, channel: str, link_fut: asyncio.Future[None]) -> None:
        """The hub's waiters for `channel` resolve when this subscription is confirmed (first success wins)."""
        waiters = list(self._waiters.get(channel, ()))

        def done(f: asyncio.Future[None]) -> None:
            if f.cancelled() or f.exception() is not None:
                return  # the channel moved: its new subscription will resolve the waiters
            for w in waiters:
                if not w.done():
                    w.set_result(None)

        link_fut.add_done_callback(done)
        self._confirming.append(link_fut)

    def _lose(self, link: ShardLink, channel: str) -> None:
        """`channel` is no longer subscribed at `link`'s node: find its owner again, keep its messages back."""
        link.forget(channel)
        self._lost.add(channel)
        self._held.setdefault(channel, [])
        self._wake.set()

    def _shard_down(self, link: ShardLink) -> None:
        for ch in list(link.desired):
            if self._where.get(ch) is link:
                self._lose(link, ch)

    def _shard_lost(self, link: ShardLink, channel: str) -> None:
        if channel in self._desired and self._where.get(channel) is link:
            self._refused[channel] = (link.node, asyncio.get_running_loop().time())
            self._lose(link, channel)

    async def _reconciler(self) -> None:
        self._wake.set()  # first pass: learn the slot map
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                stable = await self._reconcile()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the router must outlive any surprise; it retries
                log.exception("redis cluster routing failed: %s", exc)
                stable = False
            if not stable:
                await asyncio.sleep(RETRY_INTERVAL)
                self._wake.set()

    async def _reconcile(self) -> bool:
        """One pass: refresh the slot map, put every channel at its owner; True when all is confirmed there."""
        waiting = {ch for ch, link in self._where.items() if not link.connected}  # at a node not answering
        try:
            if not self._initialized:
                await self._router.initialize()
                self._initialized = True
            elif self._lost or waiting:
                await self._router.nodes_manager.initialize()
        except (RedisError, RedisClusterException, OSError) as exc:
            log.warning("redis cluster slot map unavailable (%s); retrying", exc)
            return False
        now = asyncio.get_running_loop().time()
        for ch in list(self._lost | waiting):
            node = self._owner(ch)
            if node is None:
                continue
            if ch not in self._lost:
                link = self._where.get(ch)
                if link is None or link.connected or link.node == node.name:
                    continue  # still its owner: the link resubscribes when the node is back
                self._lose(link, ch)
            refused = self._refused.get(ch)
            if refused is not None:
                if refused[0] == node.name and now - refused[1] < STALE_MAP_GRACE:
                    continue  # the map has not caught up with what that node told us: ask again shortly
                del self._refused[ch]
            old = self._where.get(ch)
            if old is not None:
                old.forget(ch)
            self._lost.discard(ch)
            link = self._link_for(node)
            self._where[ch] = link
            self._confirm_with(ch, link.subscribe(ch))
        primaries = {n.name for n in self._router.nodes_manager.get_nodes_by_server_type("primary")}
        for name, link in list(self._links.items()):
            if not link.desired and name not in primaries:
                del self._links[name]
                await link.close()
        if self._lost or not all(link.connected for link in set(self._where.values())):
            return False
        confirming, self._confirming = self._confirming, []
        if confirming:
            _, pending = await asyncio.wait(confirming, timeout=3.0)
            if pending:
                self._confirming += list(pending)
                return False
            if self._lost:
                return False
        if self._held:
            self._recovered()
        return True

    def _recovered(self) -> None:
        """Every moved channel is confirmed at its new owner: hold the streams and start the resync (it reads
        history from now on, after the new subscriptions), then hand over what was kept back; the resync merges
        those copies with history in position order."""
        held, self._held = self._held, {}
        if any(ch in self._logical for ch in held):
            log.warning("redis cluster: %d channels moved to new owners; resyncing open streams from history",
                        len(held))
            if self._on_reconnect is not None:
                self._on_reconnect()
        for messages in held.values():
            for channel, payload in messages:
                self._received_shard(channel, payload)

    # -- history (publish, replay and head are the parent's, on the cluster client) ------------------------------
    def _live_channel(self, app: str, user: str | None) -> str:
        return keys.sharded_broadcast_channel(app) if user is None else keys.sharded_user_channel(app, user)

    # -- control plane: sharded, so that the count of receivers covers every instance ----------------------------
    async def _control_publish(self, channel: str, payload: bytes) -> int:
        return int(await self.cluster.spublish(channel, payload))
