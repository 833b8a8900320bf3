"""A stream's direct-write path (stream.Stream.push): when it may write to the transport, and that order holds."""

from __future__ import annotations

import asyncio

from quart_sse.adapter import HIGH_WATER
from quart_sse.events import PING, Message
from quart_sse.registry import ConnRecord
from quart_sse.stream import CloseReason, Stream
from tests.support_faults import until

DIRECT_WRITE_LIMIT = HIGH_WATER


class Sink:
    """Stands in for an asyncio transport: records what was written, reports a buffer size."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.writes = 0  # one write per event or flush: never writelines (gh-127655)
        self.buffered = 0
        self.closing = False
        self.aborted = False

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.out += data

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return self.closing


def new_stream(sink: Sink | None = None, chunked: bool = True) -> Stream:
    stream = Stream(ConnRecord("c", "a", "u", ""), ("ch",))
    stream.sink = sink  # type: ignore[assignment]
    stream.chunked = chunked
    return stream


def msg(i: int) -> Message:
    return Message.build(str(i), "t", b"%d" % i, (1000, i))


def chunk(m: Message) -> bytes:
    return b"%x\r\n" % len(m.frame) + m.frame + b"\r\n"


async def parked(sub: Stream) -> asyncio.Task[None]:
    task = asyncio.get_running_loop().create_task(sub.wait())
    await asyncio.sleep(0)  # let it park
    assert sub.parked
    return task


async def test_parked_stream_gets_chunked_frames_directly() -> None:
    sink = Sink()
    sub = new_stream(sink, chunked=True)
    waiter = await parked(sub)
    sub.push(msg(1))
    sub.push(PING)
    assert bytes(sink.out) == chunk(msg(1)) + chunk(PING)
    assert sink.writes == 2  # one write per event: the message's own pre-joined chunk
    assert not sub.pending() and sub.last_pos == (1000, 1)
    assert not waiter.done()  # no wake-up at all
    waiter.cancel()


async def test_http10_gets_raw_frames() -> None:
    sink = Sink()
    sub = new_stream(sink, chunked=False)
    waiter = await parked(sub)
    sub.push(msg(1))
    assert bytes(sink.out) == msg(1).frame
    waiter.cancel()


async def test_queue_path_keeps_order_until_drained() -> None:
    """Not parked (the generator has not drained yet): everything queues, even once the buffer empties."""
    sink = Sink()
    sub = new_stream(sink, chunked=True)
    waiter = await parked(sub)
    sink.buffered = DIRECT_WRITE_LIMIT + 1  # a slow client: queue
    sub.push(msg(1))
    sink.buffered = 0
    sub.push(msg(2))  # must not overtake 1
    await waiter
    assert sink.out == b"" and sub.drain() == msg(1).frame + msg(2).frame
    waiter = await parked(sub)  # drained and parked again: direct
    sub.push(msg(3))
    assert bytes(sink.out) == chunk(msg(3))
    waiter.cancel()


async def test_replay_seam_and_resync_hold_use_the_queue() -> None:
    sink = Sink()
    sub = new_stream(sink, chunked=True)
    sub.after = (1000, 5)  # live copies of replayed events must be filtered by drain()
    waiter = await parked(sub)
    sub.push(msg(4))
    assert sink.out == b"" and sub.pending()
    await waiter
    assert sub.drain() == b""  # the duplicate of a replayed event is dropped
    sub.hold()
    waiter = await parked(sub)
    sub.push(msg(6))
    assert sink.out == b""  # held for the resync
    waiter.cancel()


async def test_closing_transport_or_closed_stream_is_never_written() -> None:
    sink = Sink()
    sub = new_stream(sink, chunked=True)
    waiter = await parked(sub)
    sink.closing = True
    sub.push(msg(1))
    assert sink.out == b""
    await waiter
    sub.close(CloseReason.SHUTDOWN)
    sub.push(msg(2))
    assert sink.out == b""


async def test_release_drops_live_copies_of_merged_history() -> None:
    """A live copy of an event the resync already merged (published while it read history) goes out once."""
    sub = new_stream()
    sub.last_pos = (1000, 0)
    sub.hold()
    sub.push(msg(3))  # live, held back
    for m in (msg(1), msg(2), msg(3)):  # what the resync read from history
        sub.push(m)
    sub.reorder()
    sub.push(msg(3))  # the same live copy again, after the merge
    sub.release()
    assert sub.drain() == msg(1).frame + msg(2).frame + msg(3).frame


# ------------------------------------------------------------------------------------------------ owned streams
def owned(chunked: bool = True) -> tuple[Stream, Sink]:
    """A stream whose connection was handed off: no generator, `flush` drains the queue."""
    sink = Sink()
    sub = new_stream(sink, chunked=chunked)
    sub.own()
    return sub, sink


def test_owned_stream_writes_directly_and_queues_while_the_transport_is_full() -> None:
    sub, sink = owned()
    sub.push(msg(1))
    assert bytes(sink.out) == chunk(msg(1))
    sink.buffered = DIRECT_WRITE_LIMIT + 1  # the client fell behind: the transport paused its protocol
    sub.push(msg(2))
    sub.push(msg(3))
    assert bytes(sink.out) == chunk(msg(1)) and sub.pending()
    sink.buffered = 0
    sub.push(msg(4))  # the buffer drained but resume_writing has not run yet: 4 must not overtake 2 and 3
    assert bytes(sink.out) == chunk(msg(1)) + b"%x\r\n" % (3 * len(msg(2).frame)) + \
        msg(2).frame + msg(3).frame + msg(4).frame + b"\r\n"
    assert not sub.pending() and sub.last_pos == (1000, 4)
    sub.push(msg(5))  # and straight to the transport again
    assert bytes(sink.out).endswith(chunk(msg(5)))


def test_owned_stream_flushes_what_queued_when_the_transport_drains() -> None:
    sub, sink = owned()
    sink.buffered = DIRECT_WRITE_LIMIT + 1
    sub.push(msg(1))
    sub.push(msg(2))
    sub.flush()  # still full: nothing
    assert sink.out == b""
    sink.buffered = 0
    sub.resume_writing()  # the transport's buffer drained
    assert bytes(sink.out) == b"%x\r\n" % (2 * len(msg(1).frame)) + msg(1).frame + msg(2).frame + b"\r\n"
    assert sink.writes == 1  # one chunk, one write: nothing depends on writelines pausing the protocol


def test_owned_stream_keeps_the_seam_and_the_resync_hold() -> None:
    sub, sink = owned(chunked=False)
    sub.after = (1000, 5)  # a replay went out up to 5: live copies at or before it are dropped
    sub.push(msg(5))
    assert sink.out == b""
    sub.push(msg(6))
    assert bytes(sink.out) == msg(6).frame and sub.after is None
    sub.hold()  # a resync after a Redis outage: positioned events wait, pings flow
    sub.push(msg(9))
    sub.push(PING)
    assert bytes(sink.out) == msg(6).frame + PING.frame
    sub.push(msg(7))  # what the resync found missing
    sub.push(msg(8))
    sub.reorder()
    sub.release()
    assert bytes(sink.out) == msg(6).frame + PING.frame + msg(7).frame + msg(8).frame + msg(9).frame


async def test_owned_stream_last_bytes_end_the_response_and_the_connection() -> None:
    sub, sink = owned()
    sub.close(CloseReason.DISCONNECTED)
    last = b": closing kicked\nretry: 10\n\n"
    sub.write_last(last)
    assert bytes(sink.out) == b"%x\r\n" % len(last) + last + b"\r\n0\r\n\r\n" and sink.closing
    assert not sink.aborted
    sub, sink = owned(chunked=False)  # HTTP/1.0: the close is the end
    sub.write_last(b": closing x\n\n")
    assert bytes(sink.out) == b": closing x\n\n" and sink.closing


async def test_owned_stream_cuts_a_client_that_does_not_read_its_last_bytes() -> None:
    sub, sink = owned()
    sink.buffered = 10  # still unsent when the stream ends: close() alone would wait for this client forever
    sub.write_last(b": closing shutdown\n\n", grace=0.01)
    assert sink.closing and not sink.aborted
    await until(lambda: sink.aborted, 2, 0.005)
