"""Docker workers on the real SLURM: ``./slurm.py -n 2 -d IMAGE --docker-args ... start``.

    image (no registry): ``docker import`` of a tarball that holds only a few folders, the
        loader's symlinks and cw-py/bin/python -> this test's Python; the job binds this
        machine's libraries, this Python's prefix, the clone (PYTHONPATH) and the client's
        directory read-only into it (--docker-args)
    cworkers job: srun docker run -i --rm --init --network=host ... IMAGE python -m cw.worker
        MASTER --port P  ->  a worker in each container registers with the master job
    a job: (cwd, a file of the client's directory, /.dockerenv exists)  -- run in the
        client's directory, inside a container
    ./slurm.py stop: SIGINT through srun to ``docker run`` (it proxies signals) to the worker;
        --rm removes the container: ``docker ps -a`` shows none of the image

The test SLURM's nodes share this machine's one dockerd, so a container of a worker job on
a namespaced node (cwnode2) still lives in the machine's network and UTS namespaces
(--network=host): it reaches the master by the machine's /etc/hosts. Skipped with the
reason when SLURM or docker (a running dockerd) is missing.
"""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import wait_for
from slurm_conftest_helpers import ROOT, processes_with_env, slurm_problem

from cw.client import ClusterExecutor
from cw.launch import slurm
from cw.status import status

IMAGE = f"cw-test-python:{os.getpid()}"


def docker_problem() -> str:
    """Why docker cannot run containers here ("" if it can)."""
    if shutil.which("docker") is None:
        return "docker is not installed (no docker on PATH; .ci/run installs docker.io)"
    try:
        info = subprocess.run(["docker", "info", "-f", "{{.ServerVersion}}"],
                              capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "docker info timed out"
    if info.returncode != 0:
        last = (info.stderr.strip().splitlines() or ["failed"])[-1]
        return f"no docker daemon answers (docker info: {last})"
    return ""


_problem = slurm_problem() or docker_problem()
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(bool(_problem), reason=_problem or "ok")]


def _rootfs_tar() -> bytes:
    """A root filesystem of folders and symlinks only: ``python`` is this machine's, seen
    through the bind mounts of ``_mounts``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        def add(name: str, kind: bytes = tarfile.DIRTYPE, target: str = "",
                mode: int = 0o755) -> None:
            entry = tarfile.TarInfo(name)
            entry.type, entry.linkname, entry.mode = kind, target, mode
            tar.addfile(entry)
        for name in ("etc", "root", "proc", "sys", "dev", "usr", "cw-py", "cw-py/bin"):
            add(name)
        add("tmp", mode=0o1777)
        for top in ("lib", "lib64", "bin", "sbin"):  # merged /usr: the same symlinks
            if os.path.islink(f"/{top}"):
                add(top, tarfile.SYMTYPE, os.readlink(f"/{top}"))
        add("cw-py/bin/python", tarfile.SYMTYPE, os.path.realpath(sys.executable))
    return buf.getvalue()


def _mounts(workdir: Path) -> list[str]:
    """``docker run`` options that make this Python, its packages and cw work inside."""
    ro = {"/usr/lib", "/etc/passwd", "/etc/group", sys.base_prefix, sys.prefix, str(ROOT)}
    ro |= {f"/{top}" for top in ("lib", "lib64") if os.path.isdir(f"/{top}")
           and not os.path.islink(f"/{top}")}
    ro |= {"/usr/lib64"} if os.path.isdir("/usr/lib64") else set()
    ro |= {p for p in sys.path if p and os.path.isdir(p) and not p.startswith("/usr/lib")}
    args = []
    for path in sorted(ro):
        args += ["-v", f"{path}:{path}:ro"]
    return [*args, "-v", f"{workdir}:{workdir}", "-e", f"PYTHONPATH={ROOT}"]


@pytest.fixture(scope="module")
def image():
    """The test image, imported from a tarball (no registry); removed afterwards."""
    made = subprocess.run(["docker", "import", "--change", "ENV PATH=/cw-py/bin:/usr/bin:/bin",
                           "-", IMAGE], input=_rootfs_tar(), capture_output=True, timeout=60)
    assert made.returncode == 0, made.stderr.decode()
    yield IMAGE
    subprocess.run(["docker", "rmi", "-f", IMAGE], capture_output=True, timeout=60)


def containers(image: str) -> list[str]:
    """Every container of ``image``, running or not."""
    out = subprocess.run(["docker", "ps", "-a", "-q", "--filter", f"ancestor={image}"],
                         capture_output=True, text=True, timeout=30, check=True)
    return out.stdout.split()


# a job: where it runs and what it reads there (a lambda, so that cloudpickle sends it by
# value: the containers cannot import this test module)
in_container = lambda _: (os.getcwd(), Path("data.txt").read_text(),  # noqa: E731
                          os.path.exists("/.dockerenv"))


@pytest.mark.timeout(90)
def test_docker_workers_register_run_in_the_clients_directory_and_leave_no_container(
        cw_jobs, image, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "data.txt").write_text("from the client's directory\n")
    monkeypatch.chdir(work)  # the client's directory: the jobs run there
    started = subprocess.run(
        [sys.executable, str(ROOT / "slurm.py"), "-n", "2", "--port", "0", "-d", image,
         "--docker-args", " ".join(_mounts(work)), "--timeout", "50", "start"],
        capture_output=True, text=True, timeout=70)
    assert started.returncode == 0, started.stderr
    assert len(status()["workers"]) == 2
    assert len(containers(image)) == 2

    with ClusterExecutor() as ex:
        ran = set(ex.map(in_container, range(8)))
    assert ran == {(str(work), "from the client's directory\n", True)}

    stopped = subprocess.run([sys.executable, str(ROOT / "slurm.py"), "stop"],
                             capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped cworkers job" in stopped.stdout
    assert slurm.jobs() == []
    wait_for(lambda: not containers(image), 20, "the containers to be removed (--rm)")
    assert processes_with_env(f"CW_HOME={cw_jobs}") == []
