"""The wire protocol: multipart zmq frames, a msgpack header, payloads in frames of their own.

Every message is ``[header, payload_0, payload_1, ...]`` (the master's ROUTER socket sees the
peer's identity frame in front). The header is a msgpack array whose first item is the kind;
payloads (cloudpickle blobs, out-of-band pickle buffers, tracebacks) are never re-encoded,
they ride in their own frames, in the order the header lists them::

    client                          master                            worker
      | HELLO v role info  ------->   |   <-------  HELLO v role info   |
      | <-------  WELCOME v id info   |   WELCOME v id info  -------->  |
      | SUBMIT fns jobs + frames --> queue --> JOBS ctxs fns jobs + frames -->
      | <-- RESULTS started done     |   <-- RESULTS started done busy + frames |
      | CANCEL seqs --------------->  |   CANCEL [[cid, seq]] -------->  |
      | <-- CANCELLED [[seq, ok]]     |   <-- CANCELLED [[cid, seq, ok]] |
      | HEARTBEAT <--------------->   |   <---------------> HEARTBEAT    |

A node's supervisor has a connection of its own (role "supervisor") to report deaths::

    supervisor --DIED pid code lived--> master: a worker process ended without a note; the
                                        master charges its running job now, not after the
                                        heartbeat timeout, and names how it ended

Jobs are batched: one SUBMIT, JOBS or RESULTS message carries any number of jobs.
A function travels once per (client, worker) pair; afterwards jobs name it by digest.

The lane (same machine only, see cw.conn.lane): once the master has sent a client's job to a worker
on the client's machine, it tells the client that worker's lane socket. A lone job (nothing
else in flight) then goes straight there and its result straight back: 2 hops, not 4. Lane
messages use the same headers and frames, on plain Unix sockets (cw.conn.lane frames them)::

    master --LANE path cid--> client            master --LANE_LOST path why graceful--> client
    client --LJOB cid seq digest n inbox blob?--> worker lane (its lane thread)
    worker main thread --LRESULT seq status n + frames--> client inbox (its inbox thread)
    worker I/O thread  --BOUNCE seq--> client (busy: it resends through the master)
                       --LSTARTED seq--> client (a lane job still running after a tick)
                       --LANE_BUSY cid seq--> master (then: no jobs for it, its own stolen)
    worker --LANE_RESULT cid seq status n + frames--> master --RESULTS--> client: a result
                                 over LANE_RESULT_MAX (a client slow to read cannot stall us)
    worker --LANE_REFUSED cid--> master: it cannot reach that client's inbox; the master takes
                                 the lane back for good (LANE_LOST) and the client resends
    worker --RESULTS ... lane [[cid, seq]]--> master (counts lane jobs done, a tick later)

Named batches (campaigns, cw.master.batches): jobs that belong to a batch, not to a client,
journaled before they are acknowledged; requests carry an id (rid) their reply repeats::

    client --BATCH_OPEN rid name--> master --BATCH_REPLY rid None {next, status}--> client
    client --BATCH_SUBMIT name fns jobs + frames--> journal --(fsync)--> ACKED upto error
    master --RESULTS [] done--> the batch's submitting client, once the outcome is durable
    any client --BATCH_LIST / BATCH_STATUS / BATCH_FETCH / BATCH_CANCEL / BATCH_FORGET-->
           master --BATCH_REPLY rid error value + frames--> (error: [type name, message])
"""
from __future__ import annotations

import signal
from collections.abc import Sized
from typing import Any

import msgpack

from cw.defaults import DEFAULT_PORT  # noqa: F401  (named here too)
from cw.errors import ProtocolError

VERSION = 1

# message kinds (first header item)
HELLO = 1        # peer -> master: [HELLO, version, role, info]
WELCOME = 2      # master -> peer: [WELCOME, version, master_id, info]
REFUSE = 3       # master -> peer: [REFUSE, reason]
WHO = 4          # master -> peer: [WHO]  (unknown identity: say HELLO again)
HEARTBEAT = 5    # both ways: [HEARTBEAT]; the master's adds its worker count: [HEARTBEAT, n]
BYE = 6          # peer -> master: [BYE]
SUBMIT = 10      # client -> master: [SUBMIT, fns, jobs]; fns: [digest], jobs: [[seq, digest, nframes, opts]]
                 #   opts: None or {max_retries, timeout, losses: [workers lost on the lane]}
CANCEL = 11      # client -> master: [CANCEL, [seq], queued_only?]; master -> worker: [CANCEL, [[cid, seq]]]
                 #   queued_only (optional, shutdown(cancel_futures=True)): idle workers are
                 #   fed first, then only still-queued jobs are cancelled
CANCELLED = 12   # worker -> master: [CANCELLED, [[cid, seq, ok]]]; master -> client: [CANCELLED, [[seq, ok]]]
JOBS = 20        # master -> worker: [JOBS, ctxs, fns, jobs]; ctxs: [[cid, cwd, path]],
                 #   fns: [[cid, digest]], jobs: [[cid, seq, digest, nframes]]
RESULTS = 21     # worker -> master: [RESULTS, started [[cid, seq]], done [[cid, seq, status, nframes]],
                 #   busy, lane] (busy: seconds spent running the done jobs; lane: [[cid, seq]]
                 #   of lane jobs done, for the counts only)
                 # master -> client: [RESULTS, started [seq], done [[seq, status, nframes]]]
FORGET = 22      # master -> worker: [FORGET, [cid]]  (client gone: drop its functions)
LANE = 23       # master -> client: [LANE, path, cid]
LANE_LOST = 24  # master -> client: [LANE_LOST, path, why, graceful]
LANE_BUSY = 25  # worker -> master: [LANE_BUSY, cid, seq]  (a lane job running long)
LANE_REFUSED = 26  # worker -> master: [LANE_REFUSED, cid]  (it cannot reach that client)
LANE_RESULT = 27   # worker -> master: [LANE_RESULT, cid, seq, status, nframes] + frames: a lane
                   #   job's large result, passed on to the client as a RESULTS entry
LJOB = 40       # client -> worker lane: [LJOB, cid, seq, digest, nframes, inbox, has_blob]
LRESULT = 41    # worker -> client inbox: [LRESULT, seq, status, nframes]
LSTARTED = 42   # worker -> client inbox: [LSTARTED, seq]
BOUNCE = 43     # worker -> client inbox: [BOUNCE, seq]  (not taken: send it via the master)
DIED = 28        # supervisor -> master: [DIED, pid, code, lived]: its worker process pid
                 #   ended without a note after lived seconds; code: its exit code (>= 0) or
                 #   minus the signal that killed it. The master charges the job it ran.
DRAIN = 60       # worker -> master: [DRAIN, reason, [[cid, seq]]]: it drains (its allocation
                 #   ends, or SLURM signalled it): takes nothing more, gives these unstarted
                 #   jobs back (re-queued uncharged), finishes what runs and says BYE
STATUS = 30      # any -> master: [STATUS]
STATUS_REPLY = 31  # master -> asker: [STATUS_REPLY, {...}]

BATCH_OPEN = 50    # client -> master: [BATCH_OPEN, rid, name]: reply {"next": key, "status"}
BATCH_SUBMIT = 51  # client -> master: [BATCH_SUBMIT, name, fns, jobs] + frames, as SUBMIT
ACKED = 52         # master -> client: [ACKED, name, upto, error]: its jobs up to key upto are
                   #   durable (error: None, or why those not journaled failed: JournalFull)
BATCH_LIST = 53    # client -> master: [BATCH_LIST, rid]: reply [{"name", status...}]
BATCH_STATUS = 54  # client -> master: [BATCH_STATUS, rid, name, seen, timeout]: reply the
                   #   status; with seen (a settled count) not before more than seen settled,
                   #   all did, or timeout seconds passed
BATCH_FETCH = 55   # client -> master: [BATCH_FETCH, rid, name, after, max_bytes]: reply
                   #   [[[key, status, nframes, id]], last, more] + frames: keys after
                   #   ``after`` in order; status -1 pending, -2 cancelled
BATCH_CANCEL = 56  # client -> master: [BATCH_CANCEL, rid, name]: reply the status
BATCH_FORGET = 57  # client -> master: [BATCH_FORGET, rid, name]: reply None
BATCH_REPLY = 59   # master -> client: [BATCH_REPLY, rid, error, value] + frames

ROLES = ("client", "worker", "supervisor", "status")

# a client's byte window: argument bytes it keeps at the master (cw.client.session holds back the
# rest); the master enforces twice that (cw.master.scheduler), so only a client gone rogue meets it
WINDOW_PER_WORKER = 24 << 20   # per worker connected to the master
WINDOW_MIN = 32 << 20


def window(workers: int) -> int:
    """The argument bytes a client may keep at a master with ``workers`` workers."""
    return max(WINDOW_MIN, WINDOW_PER_WORKER * workers)

# job outcome codes in RESULTS
OK = 0       # frames: pickled result, out-of-band buffers...
ERROR = 1    # frames: pickled exception (may be empty), traceback text
FAILED = 2   # frames: pickled cw error raised by the master (WorkerLost, ...)

ALIAS_SUFFIX = b"+"  # a peer's send-only second socket: its identity plus this


def alias_of(identity: bytes) -> bytes:
    return identity + ALIAS_SUFFIX


def is_alias(identity: bytes) -> bool:
    return identity.endswith(ALIAS_SUFFIX)


_pack = msgpack.Packer(use_bin_type=True).pack


def pack(*items: Any) -> bytes:
    """Encode one header."""
    return _pack(list(items))


def unpack(frame) -> list:
    """Decode one header (bytes, memoryview or zmq.Frame); raise ProtocolError if malformed."""
    data = getattr(frame, "buffer", frame)
    try:
        header = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"undecodable header: {exc}") from None
    if not isinstance(header, list) or not header or not isinstance(header[0], int):
        raise ProtocolError(f"header is not [kind, ...]: {type(header).__name__}")
    return header


def describe_exit(code: int) -> str:
    """How a process ended, from its return code (minus the signal if killed by one)."""
    if code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"killed by {name}" + (" (the OOM killer?)" if -code == signal.SIGKILL else "")


# HELLO info fields: name -> (types, most items or characters); anything else is ignored
HELLO_FIELDS = {"name": (str, 256), "host": (str, 256), "pid": (int, 0), "python": (str, 64),
                "machine": (str, 512), "alias": (bytes, 64), "slots": (int, 0),
                "lane": (str, 4096), "inbox": (bool, 0), "cwd": (str, 4096),
                "path": (list, 4096), "slurm_job": (str, 64), "alloc_end": (float, 0)}
MAX_PATH_ENTRY = 4096


def check_hello_info(info: dict) -> None:
    """Raise ProtocolError unless every known field of a HELLO's info has its type (status
    pages show them: a pid sent as bytes once made them fail)."""
    for name, (kind, most) in HELLO_FIELDS.items():
        if name not in info:
            continue
        value = info[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ProtocolError(f"HELLO field {name!r} must be {kind.__name__}, not "
                                f"{type(value).__name__}")
        if most and isinstance(value, Sized) and len(value) > most:
            raise ProtocolError(f"HELLO field {name!r} is longer than {most}")
    if any(not isinstance(p, str) or len(p) > MAX_PATH_ENTRY for p in info.get("path", ())):
        raise ProtocolError("HELLO field 'path' must be a list of strings")
    if info.get("slots", 1) < 1 or not 0 <= info.get("pid", 0) < 1 << 63:
        raise ProtocolError("HELLO fields 'slots' must be >= 1 and 'pid' a process id")
    share = info.get("share", 1.0)
    if isinstance(share, bool) or not isinstance(share, (int, float)) or \
            not 0 < share < float("inf"):
        raise ProtocolError("HELLO field 'share' must be a finite number > 0")
    if "resources" in info:  # a worker's (cw.resources): a map of names to numbers
        info["resources"] = _checked(info["resources"], "HELLO field 'resources'") or {}


def check_hello(version: Any, role: Any, info: dict, key_role: str | None,
                key_roles: dict[str, str]) -> None:
    """Raise ProtocolError unless a HELLO may register: our version, a peer role, a key of
    that role (``key_roles``: which key a role holds; None: no key, e.g. the local socket),
    and sane info fields."""
    check_version(version)
    if role not in ("client", "worker", "supervisor"):
        raise ProtocolError(f"unknown role {role!r}")
    if key_role is not None and key_role != key_roles.get(role, role):
        raise ProtocolError(f"a {key_role} key cannot register as a {role}")
    check_hello_info(info)


def check_version(version: Any) -> None:
    """Raise ProtocolError if a peer's protocol version is not ours."""
    if version != VERSION:
        raise ProtocolError(f"protocol version {version!r} does not match ours ({VERSION})")


# ---------------------------------------------------------------- entries: one parse each
def parse_died(pid, code, lived) -> None:
    """Check a DIED's fields; raise ProtocolError if they are not a pid, code, lifetime."""
    if not isinstance(pid, int) or not isinstance(code, int) or not -128 <= code <= 255 \
            or not isinstance(lived, (int, float)) or not lived >= 0:
        raise ProtocolError("DIED needs a pid, an exit code and a lifetime")


def parse_digest(value) -> bytes:
    """A function digest: 16 bytes."""
    if not isinstance(value, bytes) or len(value) != 16:
        raise ProtocolError("function digest must be 16 bytes")
    return value


def parse_key(entry) -> tuple[int, int]:
    """A job's ``(cid, seq)`` from a ``[cid, seq]`` entry."""
    cid, seq = entry
    return cid, seq


def parse_job(entry) -> tuple[int, bytes, int, dict | None]:
    """A SUBMIT job entry, checked: ``(seq, digest, nframes, opts)``."""
    if not isinstance(entry, list) or len(entry) != 4:
        raise ProtocolError("job entry must be [seq, digest, nframes, opts]")
    seq, digest, n, opts = entry
    if not isinstance(seq, int) or not isinstance(n, int) or n < 1:
        raise ProtocolError("job entry has a bad seq or frame count")
    if opts is not None:
        if not isinstance(opts, dict):
            raise ProtocolError("job options must be a map")
        retries, timeout = opts.get("max_retries", 1), opts.get("timeout", 1)
        losses = opts.get("losses", [])
        if not isinstance(retries, int) or retries < 1 or \
                not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ProtocolError("job options need max_retries >= 1 and timeout > 0")
        if not isinstance(losses, list) or not all(isinstance(x, str) for x in losses):
            raise ProtocolError("job option losses must be a list of strings")
        expected = opts.get("expected", 0)
        if not isinstance(expected, (int, float)) or not expected >= 0:
            raise ProtocolError("job option expected must be seconds >= 0")
        priority = opts.get("priority", 0)
        if isinstance(priority, bool) or not isinstance(priority, int) or \
                not -1 << 31 <= priority < 1 << 31:
            raise ProtocolError("job option priority must be an int (32 bits)")
        if "resources" in opts:  # the need, normalised: zeros dropped, floats; none: gone
            need = _checked(opts["resources"], "job option resources")
            if need:
                opts["resources"] = need
            else:
                del opts["resources"]
    return seq, parse_digest(digest), n, opts


def _checked(value: Any, what: str) -> dict | None:
    """A map of resource names to numbers >= 0 (cw.resources.check_need), else ProtocolError."""
    from cw.errors import ResourceError
    from cw.resources import check_need
    try:
        return check_need(value)
    except ResourceError as e:
        raise ProtocolError(f"{what}: {e}") from None


def parse_done(entry) -> tuple[int, int, int, int]:
    """A RESULTS done entry, checked: ``(cid, seq, status, nframes)``."""
    if not isinstance(entry, list) or len(entry) != 4 or not all(isinstance(x, int) for x in entry):
        raise ProtocolError("done entry must be [cid, seq, status, nframes]")
    cid, seq, status, n = entry
    return cid, seq, status, n
