"""The SLURM launcher (cw.slurm, ./slurm.py) against a real SLURM.

The ``slurm``-marked tests need a running SLURM where this user may submit (CI:
``tests/slurm/local_slurm.sh start`` as root first) and skip otherwise; the others check
what reaches sbatch through fake SLURM commands and run everywhere. Each test has its own CW_HOME (conftest), which the jobs
inherit, so "no process left behind" means: no live process with that CW_HOME.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from slurm_conftest_helpers import parent_of, pids_of, processes_with_env, run_cli, slurm_problem

import cw
from cw import address, launch, slurm
from cw.client import ClusterExecutor
from cw.errors import LaunchError, MasterNotFound
from cw.status import status

_problem = slurm_problem()
needs_slurm = pytest.mark.skipif(bool(_problem), reason=_problem or "SLURM is running")


@pytest.mark.slurm
@needs_slurm
@pytest.mark.timeout(90)
def test_cli_start_runs_jobs_on_four_workers_and_stop_leaves_nothing(cw_jobs):
    started = run_cli("-n", "4", "--port", "0", "--timeout", "45", "start")
    assert started.returncode == 0, started.stderr
    names = {j.name: j.state for j in slurm.jobs()}
    assert names == {"cmaster": "RUNNING", "cworkers": "RUNNING"}

    info = status()  # host=None: $CW_HOME/default.json, written by the master job
    assert len(info["workers"]) == 4
    with ClusterExecutor() as ex:
        assert list(ex.map(pow, range(40), [2] * 40)) == [i * i for i in range(40)]
        assert set(ex.map(lambda _: os.getpid(), range(40))) <= pids_of(info)

    shown = run_cli("status")
    assert shown.returncode == 0, shown.stderr
    assert "cmaster job" in shown.stdout and "4 workers" in shown.stdout

    ours = processes_with_env(f"CW_HOME={cw_jobs}")
    assert pids_of(info) <= set(ours) and {parent_of(p) for p in pids_of(info)} <= set(ours)
    stopped = run_cli("stop")
    assert "stopped cmaster job" in stopped.stdout and "stopped cworkers job" in stopped.stdout
    assert slurm.jobs() == []
    assert processes_with_env(f"CW_HOME={cw_jobs}") == []
    assert "nothing to stop" in run_cli("stop").stdout


@pytest.mark.slurm
@needs_slurm
@pytest.mark.timeout(60)
def test_a_pending_master_fails_start_with_slurms_reason(cw_jobs):
    with pytest.raises(LaunchError, match=r"cmaster job \d+ still PENDING after 2 s "
                                          r"\(reason: (?!None)\w+\)"):
        slurm.start(0, workers=False, port=0, master_options=["--cpus-per-task=1024"],
                    timeout=30, pending_timeout=2)
    assert slurm.jobs() == []  # start cancelled what it had submitted


@pytest.mark.slurm
@needs_slurm
@pytest.mark.timeout(90)
def test_launch_chooses_slurm_and_allocate_cancels_on_error(cw_jobs):
    assert launch.slurm_available()
    with pytest.raises(RuntimeError, match="boom"):
        with launch.allocate(2, port=0, timeout=45) as cluster:
            assert isinstance(cluster, slurm.SlurmCluster)
            assert len(status()["workers"]) == 2
            assert {j.name for j in slurm.jobs()} == {"cmaster", "cworkers"}
            raise RuntimeError("boom")
    assert slurm.jobs() == []
    assert processes_with_env(f"CW_HOME={cw_jobs}") == []


@pytest.mark.slurm
@needs_slurm
@pytest.mark.timeout(30)
def test_master_host_is_none_without_a_master_job(cw_jobs):
    assert slurm.master_host() is None
    assert slurm.master_address(timeout=0.3) is None


# the original README's client side, as a user would write it after ./slurm.py -n N start
RECIPE = """
import cw
from cw.client import ClientThread

results = {}

def callback(jobid, result):
    results[jobid] = result

host = cw.slurm_master_host()
ct = ClientThread(callback, host)
ct.start()
for i in range(20):
    ct.submit(i, pow, i, 2)
ct.wait()
ct.stop()
assert results == {i: i * i for i in range(20)}, results
print("ok", host)
"""


@pytest.mark.slurm
@needs_slurm
@pytest.mark.timeout(150)
def test_the_original_readmes_slurm_recipe_runs_as_written(cw_jobs, tmp_path):
    """``./slurm.py -n N start``, then ``ClientThread(callback, cw.slurm_master_host())``:
    found through the connection file, and through squeue alone when there is none."""
    started = run_cli("-n", "2", "start", timeout=120)  # as written: the default port
    assert started.returncode == 0, started.stderr
    script = tmp_path / "client.py"
    script.write_text(RECIPE)
    conn = address.default_connection_file()
    expected = {"connection file": address.read_connection_file(conn)["host"],
                "squeue": slurm.master_host()}
    for how, host in expected.items():
        if how == "squeue":
            conn.rename(tmp_path / "default.json")
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                             timeout=60, cwd=tmp_path)
        assert out.returncode == 0, f"via {how}:\n{out.stderr}"
        assert out.stdout.split() == ["ok", host]
    (tmp_path / "default.json").rename(conn)


def test_slurm_master_host_reads_the_connection_file_then_squeue(fake_slurm, cw_home,
                                                                  monkeypatch):
    env, log = fake_slurm
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("FAKE_LOG", str(log))
    assert cw.PORT == 5494
    with pytest.raises(MasterNotFound, match=r"default\.json and no RUNNING cmaster job .* "
                                             r"in squeue"):
        cw.slurm_master_host()
    log.write_text("")  # the fake squeue now lists a running cmaster on nodeA, port 6000
    assert cw.slurm_master_host() == "nodeA:6000"
    address.write_connection_file(cw_home / "default.json", {"host": "h1", "port": 5494})
    assert cw.slurm_master_host() == "h1"


FAKE_SBATCH = """#!/bin/sh
echo "sbatch $*" >> "$FAKE_LOG"; cat >> "$FAKE_LOG"; echo 7
"""
# once submitted, a master job that runs (but no master answers) until scancel is called
FAKE_SQUEUE = """#!/bin/sh
[ -e "$FAKE_LOG" ] && [ ! -e "$FAKE_LOG.cancelled" ] && echo "7|cmaster|RUNNING|nodeA|cw-port=6000|None"
exit 0
"""
FAKE_SCANCEL = """#!/bin/sh
echo "scancel $*" >> "$FAKE_LOG"; touch "$FAKE_LOG.cancelled"
"""


@pytest.fixture
def fake_slurm(tmp_path):
    """sbatch/squeue/scancel stand-ins on PATH that log what they were given."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("squeue", FAKE_SQUEUE),
                       ("scancel", FAKE_SCANCEL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "fake-slurm.log"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "FAKE_LOG": str(log)}
    return env, log


@pytest.mark.timeout(60)
def test_cli_options_reach_sbatch_and_a_failed_start_cancels(fake_slurm, cw_home):
    env, log = fake_slurm
    failed = run_cli("-n", "3", "-i", "--partition", "p1", "--time", "5", "--port", "6000",
                     "--Xmaster=--qos=high", "--Xworkers=--mem=1G", "--timeout", "1",
                     "start", env=env)
    assert failed.returncode == 1
    assert "did not answer" in failed.stderr and "nodeA:6000" in failed.stderr
    text = log.read_text()
    master, workers = text.split("sbatch ")[1:]
    assert "--job-name=cmaster" in master and "--comment=cw-port=6000" in master
    assert "--partition=p1 --time=5 --qos=high" in master
    assert f"-m cw.master --port 6000 --connection-file {cw_home}/default.json" in master
    assert "--job-name=cworkers" in workers and "--ntasks=3" in workers
    assert "--partition=p1 --time=5 --ntasks-per-node=1 --mem=1G" in workers
    assert f"export CW_HOME={cw_home}" in workers
    assert "exec srun " in workers and "-m cw.worker --slurm" in workers
    assert "scancel -s INT 7" in text and "scancel -s INT --batch 7" in text


@pytest.mark.timeout(60)
def test_docker_workers_are_told_the_master(fake_slurm, cw_home):
    env, log = fake_slurm
    run_cli("-n", "2", "-d", "img:1", "--docker-args", "--gpus all", "--port", "6000",
            "--timeout", "1", "start", env=env)
    workers = log.read_text().split("sbatch ")[2]
    assert (f"exec srun docker run -i --rm --init --network=host -e CW_HOME={cw_home} "
            f"-v {cw_home}:{cw_home} --gpus all img:1 python -m cw.worker nodeA --port 6000"
            in workers)
