"""The master: ``python -m cw.master``, a daemon that routes jobs from clients to workers.

    daemon.py      sockets, the IOLoop, parsing and checking messages, heartbeats, monitors
    scheduler.py   all routing state and rules (one owner, no sockets, no clock of its own)
    records.py     what the scheduler knows of each peer and job
    lanes.py       lane grants: which client may send lone jobs straight to which worker
    view.py        the status snapshot
    dashboard.py   the read-only web page; throughput.py its jobs-per-second samples
"""
from cw.master.daemon import Master
from cw.master.options import main, parse_args

__all__ = ["Master", "main", "parse_args"]
