"""The SLURM launcher across nodes: the local test SLURM's three nodes (the machine itself
and two network namespaces with their own hostname and address, see
tests/slurm/local_slurm.sh).

    ./slurm.py start --Xmaster=--nodelist=NODE2    the master job on a namespaced node:
         connection file "host": NODE2  ->  clients (this machine) and workers on the other
         nodes dial NODE2 over TCP with the keys in the shared CW_HOME
    ./slurm.py -n 3 -i start                        one worker per node

Each job reports ``socket.gethostname()``, which differs per node. Skipped unless a SLURM
with at least three nodes answers (``tests/slurm/local_slurm.sh start``).
"""
from __future__ import annotations

import socket
import subprocess
import time

import pytest
from slurm_conftest_helpers import processes_with_env, run_cli, slurm_problem

from cw.client import ClusterExecutor
from cw.conn import address, local
from cw.launch import slurm
from cw.status import status


def _nodes() -> list[str]:
    """The nodes sinfo lists (empty if SLURM does not answer)."""
    if slurm_problem():
        return []
    proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True,
                          timeout=10)
    return sorted(set(proc.stdout.split()))


NODES = _nodes()
_problem = slurm_problem() or ("" if len(NODES) >= 3 else
                               f"the SLURM has {len(NODES)} node(s), these tests need 3 "
                               f"(tests/slurm/local_slurm.sh start makes them)")
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(bool(_problem), reason=_problem or "ok")]


# a job: the name of the node it ran on, after holding its worker a moment (a lambda, so
# that cloudpickle sends it by value: the workers cannot import this test module)
hostname_after = lambda seconds: (time.sleep(seconds), socket.gethostname())[1]  # noqa: E731


def stop_leaves_nothing(cw_home) -> None:
    stopped = run_cli("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped cmaster job" in stopped.stdout and "stopped cworkers job" in stopped.stdout
    assert slurm.jobs() == []
    assert processes_with_env(f"CW_HOME={cw_home}") == []  # on every node: one pid space


@pytest.mark.timeout(60)
def test_master_and_workers_on_different_nodes_talk_over_tcp(cw_jobs):
    here = local.machine_id().split("/")[0]
    master_node = next(n for n in NODES if n != here)  # a namespaced node, not this machine
    others = [n for n in NODES if n != master_node]
    started = run_cli("-n", "4", "--port", "0", "--timeout", "40",
                      f"--Xmaster=--nodelist={master_node}",
                      f"--Xworkers=--nodelist={','.join(others)}", "start")
    assert started.returncode == 0, started.stderr
    info = address.read_connection_file(address.default_connection_file())
    assert info["host"] == master_node  # what the master job published: its own node's name
    assert info["local"]["machine"].split("/")[0] == master_node  # no local socket elsewhere
    workers = status()["workers"]  # from this machine, over TCP to the other node
    assert len(workers) == 4 and {w["host"] for w in workers} == set(others)

    with ClusterExecutor() as ex:
        assert list(ex.map(pow, range(40), [2] * 40)) == [i * i for i in range(40)]
        ran_on = set(ex.map(hostname_after, [0.2] * 12))
    assert master_node not in ran_on and ran_on <= set(others)
    stop_leaves_nothing(cw_jobs)


@pytest.mark.timeout(60)
def test_isolated_puts_one_worker_on_each_node(cw_jobs):
    started = run_cli("-n", str(len(NODES)), "-i", "--port", "0", "--timeout", "40", "start")
    assert started.returncode == 0, started.stderr
    workers = status()["workers"]
    assert sorted(w["host"] for w in workers) == NODES  # one each, every node
    squeued = {j.name: j for j in slurm.jobs()}
    assert squeued["cworkers"].state == "RUNNING"
    with ClusterExecutor() as ex:
        assert list(ex.map(pow, range(30), [3] * 30)) == [i ** 3 for i in range(30)]
        assert set(ex.map(hostname_after, [0.1] * 12)) <= set(NODES)
    stop_leaves_nothing(cw_jobs)
