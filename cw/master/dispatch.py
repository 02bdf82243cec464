"""What a registered peer's message does: one branch per (role, kind), to its owner.

    Master._handle: HELLO, STATUS, unknown peers, heartbeats --> here for the rest:
        client SUBMIT / CANCEL -------------------> Scheduler
        worker RESULTS / CANCELLED / LANE_* ------> Scheduler (lanes: cw.master.lanes)
        worker DRAIN -----------------------------> cw.master.evictions
        supervisor DIED --(after DIED_SETTLE)-----> Master.died --> Scheduler.died
        client BATCH_* ---------------------------> cw.master.batches
    anything else: ProtocolError (the master logs and drops it)
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from cw import protocol as P
from cw.errors import ProtocolError
from cw.master import evictions
from cw.master.batches import BATCH_KINDS
from cw.master.records import ClientRecord, PeerRecord, WorkerRecord

if TYPE_CHECKING:
    from cw.master.daemon import Master

DIED_SETTLE = 0.1          # seconds a DIED waits for the dead worker's last messages, which
#                            came on other connections and may still be queued here


def route(master: Master, peer: PeerRecord, kind: int, header: list, frames: list,
          now: float) -> None:
    """Hand one message of a registered peer to what owns its kind (the loop's thread)."""
    sched = master.scheduler
    if kind == P.BYE:
        return sched.peer_gone(peer.ident, "said goodbye", graceful=True)
    if isinstance(peer, ClientRecord) and kind == P.SUBMIT:
        return sched.submit(peer, header[1], header[2], frames)
    if isinstance(peer, ClientRecord) and kind == P.CANCEL:
        return sched.cancel(peer, header[1], bool(header[2:3] and header[2]))
    if isinstance(peer, WorkerRecord) and kind == P.RESULTS:
        return sched.results(peer, header[1], header[2], frames, now, *header[3:5])
    if isinstance(peer, WorkerRecord) and kind == P.LANE_BUSY:
        return sched.lane_busy(peer, header[1], header[2])
    if isinstance(peer, WorkerRecord) and kind == P.LANE_REFUSED:
        return sched.lane_refused(peer, header[1])
    if isinstance(peer, WorkerRecord) and kind == P.LANE_RESULT:
        return sched.lane_result(peer, header[1], header[2], header[3], header[4], frames)
    if isinstance(peer, WorkerRecord) and kind == P.DRAIN:
        return evictions.drain(sched, peer, header[1], header[2])
    if isinstance(peer, WorkerRecord) and kind == P.CANCELLED:
        return sched.cancelled(peer, header[1])
    if kind == P.DIED and peer.ident in sched.supervisors:
        _, pid, code, lived = header
        P.parse_died(pid, code, lived)
        assert master.loop is not None  # run() set it: only its loop calls us
        master.loop.call_later(DIED_SETTLE, master.died, peer, pid, code, lived)
        return
    if isinstance(peer, ClientRecord) and kind in BATCH_KINDS:
        return master.batches.handle(peer, kind, header, frames)
    raise ProtocolError(f"unexpected message kind {kind} from a {type(peer).__name__}")
