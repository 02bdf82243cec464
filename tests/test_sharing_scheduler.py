"""Sharing in the Scheduler in-process (the Rig of test_scheduler: no sockets, no clocks):
work stealing goes on while a job waits for resources no worker offers; and the protocol's
checks of the new job options and HELLO fields."""
from __future__ import annotations

import pytest
from test_scheduler import Rig

from cw import protocol as P
from cw.errors import ProtocolError


def test_a_job_nobody_can_run_does_not_stop_work_stealing():
    rig = Rig()
    first = rig.worker("first")
    c, other = rig.client("c"), rig.client("other")
    rig.submit(other, 1, opts={"resources": {"gpu": 1.0}})   # no worker has a GPU: it waits
    rig.submit(c, 2)   # long jobs: first holds two, one waiting behind the running one
    rig.flush()
    assert rig.jobs_to(first) == [1, 2]
    rig.start(first, [1], c)
    late = rig.worker("late")
    rig.flush()
    (_, cancel, _), = rig.take(P.CANCEL, first)   # late steals though the queue is not empty
    assert cancel[1] == [[c.cid, 2]]
    rig.state.cancelled(first, [[c.cid, 2, True]])
    rig.flush()
    assert rig.jobs_to(late) == [2]
    assert rig.state.queued == 1 and rig.state.status()["waiting"][0]["resources"] == "gpu=1"


def test_jobs_that_need_resources_are_not_stolen():
    rig = Rig()
    gpu = rig.worker("gpu", resources={"gpu": 1.0})
    c = rig.client("c")
    rig.submit(c, 2, opts={"resources": {"gpu": 1.0}})
    rig.flush()
    assert rig.jobs_to(gpu) == [1, 2]
    rig.start(gpu, [1], c)
    rig.worker("cpu")
    rig.flush()
    assert rig.take(P.CANCEL, gpu) == []   # the thief could not run job 2


def test_the_protocol_checks_priority_resources_and_share():
    digest = b"d" * 16
    for bad in ({"priority": 1.5}, {"priority": True}, {"priority": 1 << 40},
                {"resources": ["gpu"]}, {"resources": {"gpu": -1}}, {"resources": {"": 1}}):
        with pytest.raises(ProtocolError):
            P.parse_job([1, digest, 1, bad])
    assert P.parse_job([1, digest, 1, {"priority": 3, "resources": {"gpu": 1, "mem": 0}}])[3] \
        == {"priority": 3, "resources": {"gpu": 1.0}}     # zeros dropped, numbers as floats
    assert P.parse_job([1, digest, 1, {"resources": {}}])[3] == {}
    for bad_info in ({"share": 0}, {"share": -1.0}, {"share": "2"}, {"share": float("inf")},
                     {"resources": {"gpu": "one"}}):
        with pytest.raises(ProtocolError):
            P.check_hello_info(bad_info)
    P.check_hello_info({"share": 2.5, "resources": {"gpu": 1}})
