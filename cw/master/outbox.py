"""What the master sends a client: its news gathered per loop turn, sent in bounded messages.

    Scheduler: job done --> ClientRecord.out_done/out_frames; started --> out_started;
               cancel answered --> out_cancelled
    flush_client(client, send): RESULTS messages of about RESULT_MESSAGE bytes (a larger
               result goes alone), then one CANCELLED; a full socket queue (send says None)
               leaves the rest for the next flush
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from cw import protocol as P

if TYPE_CHECKING:
    from cw.master.records import ClientRecord

RESULT_MESSAGE = 1 << 20   # results bytes per RESULTS message (a larger result goes alone)


def add_result(client: ClientRecord, seq: int, status: int, payload: list) -> None:
    """Put one outcome in the client's outbox."""
    client.out_done.append([seq, status, len(payload)])
    client.out_frames.extend(payload)
    client.out_bytes += sum(len(f) for f in payload)


def flush_client(client: ClientRecord, send: Callable[[bytes, list], bool | None]) -> bool:
    """Send a client's news; False if its socket queue was full (try again next flush)."""
    while client.out_started or client.out_done:
        n, nframes, size = _chunk(client)
        header = P.pack(P.RESULTS, client.out_started, client.out_done[:n])
        if send(client.ident, [header, *client.out_frames[:nframes]]) is None:
            client.full = True
            return False
        client.full = False
        client.out_started = []
        del client.out_done[:n], client.out_frames[:nframes]
        client.out_bytes -= size
    return True


def flush_cancelled(client: ClientRecord, send: Callable[[bytes, list], bool | None]) -> bool:
    """Send a client's cancel answers; False if its socket queue was full."""
    if client.out_cancelled:
        if send(client.ident, [P.pack(P.CANCELLED, client.out_cancelled)]) is None:
            return False
        client.out_cancelled = []
    return True


def _chunk(client: ClientRecord) -> tuple[int, int, int]:
    """``(entries, frames, bytes)`` of the client's next RESULTS message: its outbox if that
    is small, else the first done entries up to RESULT_MESSAGE bytes (at least one)."""
    if client.out_bytes <= RESULT_MESSAGE:
        return len(client.out_done), len(client.out_frames), client.out_bytes
    n = pos = size = 0
    for _, _, count in client.out_done:
        if n and size >= RESULT_MESSAGE:
            break
        size += sum(len(f) for f in client.out_frames[pos:pos + count])
        pos += count
        n += 1
    return n, pos, size
