"""Every default a user may meet, in one place, each with why it is what it is.

Modules import these names; flags and keyword arguments override them per run.
"""
from __future__ import annotations

# the original cluster-workers' port; a master binds it unless told --port (0: any free one)
DEFAULT_PORT = 5494

# peers and the master exchange heartbeats every second; ten missed ones mean a peer is lost
# (a node cut off, a process hung): long enough for a busy node's scheduler hiccups, short
# enough that a lost node's jobs run elsewhere within seconds
DEFAULT_HEARTBEAT_INTERVAL = 1.0
DEFAULT_HEARTBEAT_TIMEOUT = 10.0

# seconds a new connection may take to say who it is before the master closes it (a
# stranger holding sockets open must not exhaust the master's descriptors)
DEFAULT_HANDSHAKE_TIMEOUT = 10.0

# largest message the master reads (zmq's maxmsgsize): one job's arguments or one result
# of up to 1 GiB; a peer announcing more is cut off before its bytes are buffered
DEFAULT_MAX_MESSAGE_SIZE = 1 << 30

# seconds a client or worker waits for the master to answer its first HELLO
DEFAULT_CONNECT_TIMEOUT = 10.0

# seconds a client waits for a silent master to come back (a restart) before its jobs
# fail with MasterLost
DEFAULT_MASTER_TIMEOUT = 120.0

# a job runs again on another worker after its worker died or went silent, at most this
# many times in all: enough for a node lost by bad luck, few enough that a job that kills
# its worker (OOM, segfault) fails fast with WorkerLost naming the deaths
DEFAULT_MAX_RETRIES = 3

# most jobs one worker process holds (running plus prefetched); the master adapts what it
# sends to the measured job time, so this caps only very short jobs
DEFAULT_SLOTS = 64

# jobs of one map() in flight at once: bounds the client's memory for huge iterables
DEFAULT_MAP_WINDOW = 20_000
