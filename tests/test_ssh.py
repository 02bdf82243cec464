"""cw.ssh against a real OpenSSH server this test starts on a free loopback port.

    ssh-keygen: throwaway host key + client key (authorized_keys) in tmp_path
    /usr/sbin/sshd -D -f sshd_config -e  (a Proc: stopped by its group at teardown)
    python -m cw.ssh ... start  --> 2 workers on "localhost" register with the master fixture
    jobs run on them; cw.ssh stop --> they leave the master; no process of theirs is left
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, wait_for

from cw.client import ClusterExecutor
from cw.launch.ssh import HostSpec, SshError, parse_hosts, parse_ports, ssh_command, ssh_options

SSHD = "/usr/sbin/sshd"


def test_host_and_port_syntax():
    specs = parse_hosts("cl-1:8, alice@cl-2 ,cl-3:2", processes=4)
    assert [(s.target, s.processes) for s in specs] == \
        [("cl-1", 8), ("alice@cl-2", 4), ("cl-3", 2)]
    parse_ports(["2222", "cl-3=2200"], specs)
    assert [s.ssh_port for s in specs] == [2222, 2222, 2200]
    for bad in ("cl-1:x", "cl-1:0", "", "@:3"):
        with pytest.raises(SshError):
            parse_hosts(bad)
    with pytest.raises(SshError, match="not in --hosts"):
        parse_ports(["nowhere=22"], [HostSpec("cl-1")])
    assert ssh_options(["StrictHostKeyChecking=no", "-i /k -v"]) == \
        ["-o", "StrictHostKeyChecking=no", "-i", "/k", "-v"]


@pytest.mark.parametrize("hosts", ["-oProxyCommand=touch MARK", "ok:2,-oProxyCommand=touch MARK",
                                   "-oProxyCommand=touch MARK@host"])
def test_a_host_name_cannot_pass_for_an_ssh_option(tmp_path, hosts):
    """``--hosts=-o...`` would give ssh an option (ProxyCommand runs a command): refused
    with a clear error before any ssh runs."""
    mark, shim = tmp_path / "ssh-ran", tmp_path / "bin"
    shim.mkdir()
    (shim / "ssh").write_text(f"#!/bin/sh\ntouch {mark}\nexit 255\n")
    (shim / "ssh").chmod(0o755)
    done = subprocess.run([sys.executable, "-m", "cw.ssh", "start", "--master", "127.0.0.1:9",
                           f"--hosts={hosts.replace('MARK', str(mark))}"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": f"{shim}:{os.environ['PATH']}"})
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "cannot start with '-'" in done.stderr
    assert not mark.exists(), "ssh ran"


def test_the_destination_comes_after_the_end_of_ssh_options():
    argv = ssh_command("alice@cl-1", 2222, ["-o", "LogLevel=ERROR"], "python3")
    assert argv[argv.index("--") + 1:] == ["alice@cl-1", "python3 -"]
    assert argv.index("-p") < argv.index("--")
    with pytest.raises(SshError, match="cannot start with"):
        ssh_command("-oProxyCommand=x", None, [], "python3")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
                   check=True, timeout=30)
    return path


@pytest.fixture
def sshd(procs, tmp_path):
    """A throwaway sshd on 127.0.0.1; yields the cw.ssh arguments that reach it."""
    if not os.path.exists(SSHD) or not shutil.which("ssh") or not shutil.which("ssh-keygen"):
        pytest.skip("needs OpenSSH: apt-get install -y openssh-server")
    try:
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
    except OSError as exc:
        pytest.skip(f"sshd needs /run/sshd: {exc}")
    d = tmp_path / "sshd"
    d.mkdir()
    host_key, client_key = keygen(d / "host_key"), keygen(d / "client_key")
    shutil.copy(d / "client_key.pub", d / "authorized_keys")
    port = free_port()
    config = d / "sshd_config"
    config.write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
PidFile {d / 'sshd.pid'}
AuthorizedKeysFile {d / 'authorized_keys'}
StrictModes no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
""")
    proc = procs.run([SSHD, "-D", "-f", str(config), "-e"])

    def listening():
        assert proc.popen.poll() is None, f"sshd exited:\n{proc.stderr()}"
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0
    wait_for(listening, 15, "sshd to listen")
    return ["--port", str(port), "--ssh-option", f"-i {client_key}",
            "--ssh-option", "StrictHostKeyChecking=no",
            "--ssh-option", "UserKnownHostsFile=/dev/null", "--ssh-option", "LogLevel=ERROR"]


def cw_ssh(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cw.ssh", *args], capture_output=True,
                          text=True, timeout=timeout)


def recorded_pids(cw_home: Path) -> list[int]:
    state = json.loads((cw_home / "ssh.json").read_text())
    return [r["pid"] for recs in state["masters"].values() for r in recs]


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in "ZX":
            members.append(int(entry.name))
    return members


@pytest.mark.timeout(90)
def test_start_run_stop_over_ssh(master, sshd, cw_home):
    common = ["--master", master.address, "--hosts", "localhost:2", *sshd,
              "--python", sys.executable, "--env", f"PYTHONPATH={ROOT}",
              "--env", f"CW_HOME={cw_home}"]
    pids: list[int] = []
    try:
        started = cw_ssh(*common, "start")
        assert started.returncode == 0, started.stderr
        assert "localhost: started 2 workers" in started.stdout
        pids = recorded_pids(cw_home)
        assert len(pids) == 1
        workers = master.wait_workers(2)["workers"]
        assert all(group_members(pids[0]).count(w["pid"]) for w in workers)

        with ClusterExecutor(master.host, master.port) as ex:
            assert list(ex.map(lambda x: x * 3, range(30))) == [x * 3 for x in range(30)]
        assert sum(w["done"] for w in master.status()["workers"]) == 30

        shown = cw_ssh("--master", master.address, "status")
        assert shown.returncode == 0, shown.stderr
        assert f"supervisor {pids[0]} of 2 workers" in shown.stdout
        assert "running" in shown.stdout and "2 workers on" in shown.stdout

        stopped = cw_ssh("--master", master.address, "stop")
        assert stopped.returncode == 0, stopped.stderr
        assert f"localhost: supervisor {pids[0]} stopped" in stopped.stdout
        master.wait_workers(0)
        assert group_members(pids[0]) == []
        assert recorded_pids(cw_home) == []
        again = cw_ssh("--master", master.address, "stop")
        assert again.returncode == 0 and "no recorded workers" in again.stdout
    finally:
        for pid in pids:  # whatever failed above, leave nothing running
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_host_without_cw_fails_clearly(master, sshd, cw_home, tmp_path):
    bare = tmp_path / "bare"  # a real interpreter that cannot import cw
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True,
                   timeout=60)
    failed = cw_ssh("--master", master.address, "--hosts", "localhost", *sshd,
                    "--python", str(bare / "bin" / "python"), "--chdir", str(tmp_path), "start")
    assert failed.returncode == 1, failed.stdout
    assert "localhost: cannot import cw.worker" in failed.stderr
    assert not (cw_home / "ssh.json").exists() or recorded_pids(cw_home) == []
