"""SLURM: a requeue that is safe with collectives, and the environment helpers the recipes use.

Lightning's own SLURM requeue saves a checkpoint *inside the signal handler*: the handler runs on
whichever rank got the signal, in the middle of whatever that rank was doing (often a collective),
so the other ranks are not at the same point and the save can deadlock or write a torn state.
:class:`SLURMRequeue` replaces it:

* the handler (``SIGUSR1``/``SIGUSR2``; ``#SBATCH --signal=USR1@120``, submitit sends ``USR2``)
  only sets a flag;
* at every step boundary (``on_train_batch_end``: after the optimizer step) all ranks all-reduce the
  flag, so they agree on the same step;
* they save ``hpc_ckpt_<n>.ckpt`` in ``trainer.default_root_dir`` (a collective save: rank 0
  writes, everyone waits) and set ``trainer.should_stop``, so Lightning logs that step's metrics itself,
  as it logs every step;
* at the next hook Lightning calls after that log (the start of the next batch, of validation, the end
  of the epoch or of training) they flush the loggers, stop listening to ``SIGTERM``, and only then does
  rank 0 run ``scontrol requeue``; then every rank exits. The requeue is what makes SLURM end the job
  (``SIGTERM``, then ``SIGKILL`` after ``KillWait``), so everything the next job relies on - the
  checkpoint and every logged step - is on disk before it, and nothing after it matters;
* the requeued job starts the same command in the same run directory, and Lightning resumes from the
  newest ``hpc_ckpt_*.ckpt`` there by itself (it does so whenever it runs under SLURM and
  ``fit(ckpt_path=None)``). The strategy's checkpoint holds the sampler position and the RNG state,
  so the next step is the one that was not yet taken.

Outside SLURM (or when the requeue fails) the same signal saves the checkpoint and stops training
cleanly; ``fit(ckpt_path=...)`` continues from it.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

DEFAULT_SIGNALS = ("SIGUSR1", "SIGUSR2")
HPC_PREFIX = "hpc_ckpt_"


# ---------------------------------------------------------------------------------- environment
def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list, ``"gpu[01-03,7],login1"``, as names (what ``scontrol show hostnames`` does)."""
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", hostlist or ""):
        match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not match:
            hosts.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        for item in ranges.split(","):
            lo, _, hi = item.partition("-")
            if not hi:
                hosts.append(f"{prefix}{lo}{suffix}")
                continue
            width = len(lo)
            hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
    return hosts


def _tasks_per_node(env) -> int:
    """``SLURM_NTASKS_PER_NODE`` may read ``4`` or ``4(x2)``; without it, ntasks / nodes."""
    value = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if value:
        return int(re.match(r"\d+", value).group())
    return int(env.get("SLURM_NTASKS", "1")) // max(1, int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1"))))


@dataclass(frozen=True)
class SlurmJob:
    """What one task of a SLURM job needs to know to join a run (from ``os.environ`` by default)."""

    job_id: str
    restart_count: int
    nodes: list[str]
    tasks_per_node: int
    global_rank: int
    local_rank: int
    node_rank: int

    @property
    def world_size(self) -> int:
        return len(self.nodes) * self.tasks_per_node

    @property
    def main_address(self) -> str:
        return self.nodes[0]

    @property
    def main_port(self) -> int:
        """A port every task derives alike, different after each requeue (the old one may linger)."""
        return 20000 + (int(re.sub(r"\D", "", self.job_id) or 0) * 10 + self.restart_count) % 20000

    @classmethod
    def from_env(cls, env=None) -> "SlurmJob | None":
        env = os.environ if env is None else env
        if "SLURM_JOB_ID" not in env:
            return None
        job_id = env["SLURM_JOB_ID"]
        if env.get("SLURM_ARRAY_TASK_ID") and env.get("SLURM_ARRAY_JOB_ID"):
            job_id = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
        nodes = expand_hostlist(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", ""))
        return cls(job_id=job_id, restart_count=int(env.get("SLURM_RESTART_COUNT", "0")), nodes=nodes,
                   tasks_per_node=_tasks_per_node(env), global_rank=int(env.get("SLURM_PROCID", "0")),
                   local_rank=int(env.get("SLURM_LOCALID", "0")), node_rank=int(env.get("SLURM_NODEID", "0")))

    def check_trainer(self, devices: int, num_nodes: int) -> None:
        """Lightning needs one task per device on every node: say so before it hangs in a rendezvous."""
        if (self.tasks_per_node, len(self.nodes)) != (devices, num_nodes):
            raise ValueError(f"SLURM job {self.job_id} runs {self.tasks_per_node} tasks per node on {len(self.nodes)} "
                             f"node(s) but the trainer asks for devices={devices}, num_nodes={num_nodes}: set "
                             f"--ntasks-per-node={devices} --nodes={num_nodes} (or trainer.devices/num_nodes to match)")


def requeue_command(job: SlurmJob) -> list[str]:
    return ["scontrol", "requeue", job.job_id]


def hpc_checkpoint_path(folder) -> Path:
    """The next ``hpc_ckpt_<n>.ckpt`` in ``folder``: Lightning resumes from the highest ``n`` under SLURM."""
    versions = [int(m.group(1)) for p in Path(folder).glob(f"{HPC_PREFIX}*.ckpt")
                if (m := re.fullmatch(rf"{HPC_PREFIX}(\d+)\.ckpt", p.name))]
    return Path(folder) / f"{HPC_PREFIX}{max(versions, default=0) + 1}.ckpt"


def disable_lightning_requeue(trainer: "pl.Trainer") -> bool:
    """Turn off Lightning's in-handler checkpoint + requeue. True if there was one to turn off."""
    env = getattr(trainer._accelerator_connector, "cluster_environment", None)
    if isinstance(env, SLURMEnvironment) and env.auto_requeue:
        env.auto_requeue = False
        return True
    return False


def cluster_plugins() -> list:
    """``Trainer(plugins=...)``: a SLURMEnvironment without auto-requeue when running under ``srun``, else none."""
    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


# ---------------------------------------------------------------------------------- the callback
class SLURMRequeue(Callback):
    """Checkpoint, requeue and exit at a step boundary that every rank agrees on (see the module doc).

    signals: names of the signals that ask for it. requeue: run ``scontrol requeue`` under SLURM
    (otherwise only save and stop). exit_code: what every rank exits with after a successful requeue
    (the process leaves with ``os._exit`` so that nothing after ``fit`` - a submitit result file,
    Hydra's return value - reports the unfinished run as done).
    """

    def __init__(self, signals=DEFAULT_SIGNALS, requeue: bool = True, exit_code: int = 0) -> None:
        self.signals = tuple(signals)
        self.requeue = requeue
        self.exit_code = exit_code
        self.requested = False
        self.saved_path: Path | None = None
        self._requeue_pending = False  # checkpoint saved, waiting for Lightning to log the step
        self._previous: dict = {}

    # signals --------------------------------------------------------------------
    def _handler(self, signum, frame) -> None:
        self.requested = True  # nothing else here: the step boundary does the work

    def _install(self) -> None:
        for name in self.signals:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._handler)

    def _ignore_sigterm(self):
        """Ignore SIGTERM; returns the handler it replaces (put back if the requeue fails).

        `scontrol requeue` makes SLURM send SIGTERM to every task at once. Lightning's SIGTERM handler
        runs a collective (a broadcast from rank 0) inside the handler, on whichever rank it lands and
        wherever that rank is - it would meet our own broadcast and barrier out of order (gloo aborts
        with "Received data size doesn't match"). The job is leaving anyway: let SIGTERM pass."""
        return signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def _restore(self, *signums) -> None:
        for signum in signums or list(self._previous):
            previous = self._previous.pop(signum)
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)

    # hooks ---------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if disable_lightning_requeue(trainer):
            rank_zero_info("lightning_sp.slurm: Lightning's in-handler SLURM requeue is off; SLURMRequeue handles "
                           f"{', '.join(self.signals)} at step boundaries")
        job = SlurmJob.from_env()
        if stage == "fit" and job is not None and SLURMEnvironment.detect():
            job.check_trainer(trainer.num_devices, trainer.num_nodes)

    def on_train_start(self, trainer, pl_module) -> None:
        # after Lightning and any wrapper (submitit) installed theirs: ours take over during training
        self._install()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        self.requested = False
        self._checkpoint(trainer)
        # Lightning logs this step after on_train_batch_end (and always logs the step at which training
        # stops), then leaves the loop; the requeue waits for the first hook after that log
        trainer.should_stop = True
        self._requeue_pending = self.requeue and SlurmJob.from_env() is not None

    # the first hook Lightning calls after it logged the step (all ranks reach the same one):
    def on_validation_start(self, trainer, pl_module) -> None:  # the step's validation, if it has one
        self._requeue_if_pending(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # the step ended the epoch
        self._requeue_if_pending(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # min_steps kept it going
        self._requeue_if_pending(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._requeue_if_pending(trainer)
        self._restore()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore()

    # the work --------------------------------------------------------------------
    def _checkpoint(self, trainer) -> None:
        folder = trainer.default_root_dir
        path = trainer.strategy.broadcast(str(hpc_checkpoint_path(folder)) if trainer.is_global_zero else None, 0)
        trainer.save_checkpoint(path)  # every rank takes part; it ends in a barrier
        self.saved_path = Path(path)
        rank_zero_info(f"lightning_sp.slurm: saved {path} after step {trainer.global_step}")

    def _requeue_if_pending(self, trainer) -> None:
        if not self._requeue_pending:
            return
        self._requeue_pending = False
        # everything the requeued job relies on is written before the requeue: SLURM starts ending this
        # job as soon as `scontrol requeue` returns (SIGTERM now, SIGKILL after KillWait)
        for logger in trainer.loggers:
            logger.save()
        sigterm_handler = self._ignore_sigterm()
        trainer.strategy.barrier("lightning_sp.slurm.before_requeue")  # no rank still listens to SIGTERM
        job = SlurmJob.from_env()
        ok = False
        if trainer.is_global_zero:
            run = subprocess.run(requeue_command(job), capture_output=True, text=True)
            ok = run.returncode == 0
            if not ok:
                rank_zero_warn(f"lightning_sp.slurm: `{' '.join(requeue_command(job))}` failed "
                               f"({run.returncode}): {run.stderr.strip()}; stopping after the checkpoint")
            else:
                rank_zero_info(f"lightning_sp.slurm: requeued job {job.job_id}; exiting")
        ok = trainer.strategy.broadcast(ok, 0)
        if not ok:  # should_stop ends training (unless min_steps keeps it going); the step is logged once
            signal.signal(signal.SIGTERM, sigterm_handler)  # the training-time one (ours, if SIGTERM is ours)
            return
        # everyone has the answer before anyone leaves (a rank gone mid-collective resets its peers'
        # connections); the pause lets the barrier's last messages land
        trainer.strategy.barrier("lightning_sp.slurm.requeue")
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(2.0)
        os._exit(self.exit_code)
