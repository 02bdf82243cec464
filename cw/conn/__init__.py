"""The wire below every role: how a peer finds, trusts and talks to the master.

    address.py    where the master is (explicit, $CW_MASTER, connection files, finders a
                  launcher adds) and the private files under $CW_HOME
    security.py   CurveZMQ keys per role, connection files, ZAP, which route a peer dials
    local.py      the same-machine path: a Unix socket in a directory private to the user
    peer.py       Connection: a registered DEALER on an I/O thread (HELLO, heartbeats)
    alias.py      Alias: a peer's second, send-only socket for one other thread
    lane.py       the lane's framing and sockets (plain Unix sockets, bounded sends)
    zloop.py      reading a zmq socket on a tornado IOLoop in batches

Nothing here imports a role package (cw.master, cw.worker, cw.client, cw.launch).
"""
