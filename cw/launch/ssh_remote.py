"""What ``cw.ssh`` runs on a remote host, and how: one ``ssh host python -`` per command,
a small script on its stdin, one line of JSON back.

    ssh_command(target) --> ["ssh", -o BatchMode=yes ..., "--", target, "python -"]
    run_remote(target, script, args): the script (START, STATUS or STOP) with ARGS replaced
        by its JSON arguments --> its last stdout line, parsed; SshError naming the host and
        ssh's own message otherwise
"""
from __future__ import annotations

import json
import shlex
import subprocess

from cw.errors import SshError

SSH_DEFAULTS = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
SSH_TIMEOUT = 60.0      # seconds one ssh command may take, on top of any remote wait


def ssh_options(values: list[str]) -> list[str]:
    """``--ssh-option`` values as ssh arguments: ``-o VALUE``, or split raw ``-x ...`` text."""
    args: list[str] = []
    for value in values:
        args += shlex.split(value) if value.startswith("-") else ["-o", value]
    return args


# ---------------------------------------------------------------- remote scripts
START = r"""
import json, os, socket, subprocess, sys, time
a = json.loads(ARGS)
env = dict(os.environ, **a["env"])
check = subprocess.run([sys.executable, "-c", "import cw.worker"], env=env,
                       cwd=a["cwd"] or None, capture_output=True, text=True)
if check.returncode:
    print(json.dumps({"error": "cannot import cw.worker with %s: %s"
                      % (sys.executable, check.stderr.strip().splitlines()[-1:])}))
    sys.exit(0)
home = os.path.expanduser(env.get("CW_HOME") or "~/.cw")
logs = os.path.join(home, "ssh-logs")
umask = os.umask(0o077)  # a private folder and log (a job's output may hold secrets)
os.makedirs(logs, mode=0o700, exist_ok=True)
log = os.path.join(logs, "worker-%s-%d.log" % (socket.gethostname(), time.time_ns()))
with open(log, "ab") as out, open(os.devnull, "rb") as null:
    os.umask(umask)  # the worker's jobs keep the user's own
    p = subprocess.Popen([sys.executable, "-m", "cw.worker"] + a["argv"], stdin=null,
                         stdout=out, stderr=out, cwd=a["cwd"] or None, env=env,
                         start_new_session=True)
print(json.dumps({"pid": p.pid, "hostname": socket.gethostname(), "log": log}))
"""

PROCS = r"""
import json, os, signal, subprocess, sys, time
a = json.loads(ARGS)
def ours(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return b"cw.worker" in f.read()
    except FileNotFoundError:
        return False
    except OSError:
        r = subprocess.run(["ps", "-o", "args=", "-p", str(pid)], capture_output=True)
        return b"cw.worker" in r.stdout
def group_alive(pgid):
    if not os.path.isdir("/proc/self"):
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for name in os.listdir("/proc"):
        try:
            with open("/proc/%s/stat" % name) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in "ZX":  # zombies are gone
            return True
    return False
"""

STATUS = PROCS + r"""
print(json.dumps({str(pid): "running" if ours(pid) else "gone" for pid in a["pids"]}))
"""

STOP = PROCS + r"""
out = {}
for pid in a["pids"]:
    out[str(pid)] = "gone"
    if ours(pid):
        try:
            os.kill(pid, signal.SIGTERM)  # the supervisor stops its workers, then itself
            out[str(pid)] = "stopped"
        except ProcessLookupError:
            pass
deadline = time.monotonic() + a["timeout"]
waiting = [pid for pid in a["pids"] if out[str(pid)] == "stopped"]
while waiting and time.monotonic() < deadline:
    waiting = [pid for pid in waiting if group_alive(pid)]
    time.sleep(0.05)
for pid in waiting:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    out[str(pid)] = "killed"
print(json.dumps(out))
"""


def ssh_command(target: str, ssh_port: int | None, options: list[str],
                python: str) -> list[str]:
    """The ssh command line that runs ``python -`` on ``target``: ``--`` ends ssh's options,
    so no host name can pass for one."""
    if target.startswith("-"):
        raise SshError(f"bad host {target!r}: a host or user name cannot start with '-'")
    return ["ssh", *SSH_DEFAULTS, *options, *(["-p", str(ssh_port)] if ssh_port else []),
            "--", target, f"{shlex.quote(python)} -"]


def run_remote(target: str, ssh_port: int | None, options: list[str], python: str,
               script: str, args: dict, timeout: float = SSH_TIMEOUT) -> dict:
    """Run ``script`` with ``args`` by ``python -`` on ``target``; return its JSON answer."""
    argv = ssh_command(target, ssh_port, options, python)
    code = script.replace("ARGS", repr(json.dumps(args)), 1)
    try:
        done = subprocess.run(argv, input=code, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SshError(f"{target}: ssh did not finish within {timeout:g} s") from None
    lines = done.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else None
    except ValueError:
        answer = None
    if done.returncode or not isinstance(answer, dict):
        why = done.stderr.strip() or done.stdout.strip() or f"exit code {done.returncode}"
        raise SshError(f"{target}: {why}")
    if "error" in answer:
        raise SshError(f"{target}: {answer['error']}")
    return answer
