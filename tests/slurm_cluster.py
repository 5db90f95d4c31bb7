"""A real SLURM controller on this machine for the tests: munge + slurmctld + slurmd from Debian's packages.

`LocalSlurm(folder).start()` installs the packages with apt-get when `slurmctld` is missing (root and
apt needed), writes a munge key and a slurm.conf under `folder`, starts `munged`, `slurmctld` and
`slurmd` without systemd and waits until `sinfo` shows the node idle; `stop()` ends them by their pid
files. Everything lives under `folder` (own munge socket, ports, state), so nothing system-wide changes
besides the installed packages. `python tests/slurm_cluster.py DIR` starts one by hand and prints the
`SLURM_CONF` to export.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


class SlurmUnavailable(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_installed() -> None:
    if all(shutil.which(p) or Path("/usr/sbin", p).exists() for p in ("slurmctld", "slurmd", "munged", "sbatch")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable("slurmctld/slurmd/munge are not installed and cannot be: apt-get install "
                               f"{' '.join(PACKAGES)} needs root and apt-get (euid={os.geteuid()})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if run.returncode:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed ({run.returncode}): {run.stderr[-2000:]}")


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class LocalSlurm:
    def __init__(self, folder, cpus: int = 8) -> None:
        self.folder = Path(folder).resolve()
        self.cpus = cpus
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.folder / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def _write(self) -> None:
        f = self.folder
        for sub in ("state", "spool", "log", "munge"):
            (f / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(f / "munge", 0o700)
        key = f / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.munge_socket = f / "munge" / "munge.socket"
        self.conf.write_text(f"""\
ClusterName=lsptest
SlurmctldHost={self.host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
StateSaveLocation={f / 'state'}
SlurmdSpoolDir={f / 'spool'}
SlurmctldPidFile={f / 'slurmctld.pid'}
SlurmdPidFile={f / 'slurmd.pid'}
SlurmctldLogFile={f / 'log' / 'slurmctld.log'}
SlurmdLogFile={f / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=10
InactiveLimit=0
MinJobAge=600
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName={self.host} CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")

    def _daemon(self, args: list[str], pidfile: Path, what: str) -> None:
        run = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60)
        if run.returncode:
            raise SlurmUnavailable(f"{what} failed to start ({run.returncode}): {run.stdout}{run.stderr}")
        for _ in range(100):
            if pidfile.exists() and pidfile.read_text().strip():
                return
            time.sleep(0.1)
        raise SlurmUnavailable(f"{what} wrote no pid file {pidfile}; see {self.folder / 'log'}")

    def start(self, timeout: float = 120) -> "LocalSlurm":
        ensure_installed()
        self._write()
        f = self.folder
        self._daemon([_sbin("munged"), "--force", f"--socket={self.munge_socket}", f"--key-file={f / 'munge/munge.key'}",
                      f"--pid-file={f / 'munge/munged.pid'}", f"--log-file={f / 'log/munged.log'}",
                      f"--seed-file={f / 'munge/munged.seed'}"], f / "munge/munged.pid", "munged")
        self._daemon([_sbin("slurmctld"), "-f", str(self.conf), "-i"], f / "slurmctld.pid", "slurmctld")
        self._daemon([_sbin("slurmd"), "-f", str(self.conf)], f / "slurmd.pid", "slurmd")
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            run = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=self.env, capture_output=True, text=True)
            state = (run.stdout + run.stderr).strip()
            if state == "idle":
                return self
            time.sleep(1)
        self.stop()
        raise SlurmUnavailable(f"the node did not become idle in {timeout} s (sinfo: {state!r}); logs in {f / 'log'}")

    def stop(self) -> None:
        for pidfile in ("slurmd.pid", "slurmctld.pid", "munge/munged.pid"):
            path = self.folder / pidfile
            try:
                pid = int(path.read_text().strip())
            except (OSError, ValueError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)

    # clients -------------------------------------------------------------------
    def run(self, *args: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        env = dict(self.env, **kw.pop("env", {}))
        out = subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=timeout, **kw)
        if check and out.returncode:
            raise RuntimeError(f"{' '.join(args)} failed ({out.returncode}): {out.stdout}{out.stderr}")
        return out

    def job_field(self, job_id: str, field: str) -> str:
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        for item in out.split():
            key, _, value = item.partition("=")
            if key == field:
                return value
        return ""

    def wait(self, job_id: str, until, timeout: float, poll: float = 1.0) -> str:
        """Poll the job's state until `until(state)`; on timeout scancel the job and raise."""
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            state = self.job_field(job_id, "JobState")
            if until(state):
                return state
            time.sleep(poll)
        self.run("scancel", job_id, check=False)
        raise TimeoutError(f"job {job_id} still {state!r} after {timeout} s: cancelled")


if __name__ == "__main__":
    cluster = LocalSlurm(sys.argv[1] if len(sys.argv) > 1 else "/tmp/lsp-slurm").start()
    print(f"export SLURM_CONF={cluster.conf}   # stop: python -c 'import slurm_cluster' ... or kill the pids in {cluster.folder}")
