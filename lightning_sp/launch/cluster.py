"""Lightning cluster environment for the tasks of submitit's local executor (``submitit.LocalExecutor``,
which Hydra's ``submitit_local`` launcher and the recipes' ``hydra/launcher=local_submitit`` use).

The local executor starts ``tasks_per_node`` processes itself, one per rank, and tells each which one it
is through ``SUBMITIT_LOCAL_*`` variables (``submitit/local/local.py``: ``start_controller`` sets
``SUBMITIT_EXECUTOR=local``, ``SUBMITIT_LOCAL_NTASKS``, ``SUBMITIT_LOCAL_NODEID=0``,
``SUBMITIT_LOCAL_JOB_NUM_NODES=1``; ``Controller.start_tasks`` sets ``SUBMITIT_LOCAL_GLOBALID`` =
``SUBMITIT_LOCAL_LOCALID`` = the task index and ``SUBMITIT_LOCAL_JOB_ID`` = the controller's pid).
Lightning knows none of these: it takes every task for a lone main process, and its launcher re-runs
``sys.argv`` - submitit's ``_submit`` entry point - once per extra device in every task.
:class:`SubmititLocalEnvironment` reads the ranks from them and says the processes exist already, so
Lightning joins them instead. Pass it as ``Trainer(plugins=[SubmititLocalEnvironment()])``; the
``local_submitit`` launcher config adds it to ``trainer.plugins``.

The local executor runs on one machine and sets no rendezvous: the main address is ``MASTER_ADDR`` or
``127.0.0.1``, the port ``MASTER_PORT`` or one derived from the job id, which every task of a job has
alike and concurrent jobs (a sweep) do not share.
"""
from __future__ import annotations

import os

from lightning.pytorch.plugins.environments import ClusterEnvironment

JOB_ID = "SUBMITIT_LOCAL_JOB_ID"
NUM_TASKS = "SUBMITIT_LOCAL_NTASKS"
NUM_NODES = "SUBMITIT_LOCAL_JOB_NUM_NODES"
NODE = "SUBMITIT_LOCAL_NODEID"
GLOBAL_RANK = "SUBMITIT_LOCAL_GLOBALID"
LOCAL_RANK = "SUBMITIT_LOCAL_LOCALID"


class SubmititLocalEnvironment(ClusterEnvironment):
    """The ranks of a task started by submitit's local executor (see the module doc).

    env: the variables to read (``os.environ`` by default; a dict in tests).
    """

    def __init__(self, env=None) -> None:
        super().__init__()
        self._env = os.environ if env is None else env

    def _int(self, name: str, default: int | None = None) -> int:
        value = self._env.get(name)
        if value is None:
            if default is None:
                raise RuntimeError(f"SubmititLocalEnvironment: {name} is not set; this process was not started by "
                                   "submitit's local executor (hydra/launcher=local_submitit)")
            return default
        return int(value)

    @staticmethod
    def detect(env=None) -> bool:
        """True inside a task of submitit's local executor."""
        env = os.environ if env is None else env
        return env.get("SUBMITIT_EXECUTOR") == "local" and GLOBAL_RANK in env

    @property
    def creates_processes_externally(self) -> bool:
        return True

    @property
    def main_address(self) -> str:
        return self._env.get("MASTER_ADDR", "127.0.0.1")

    @property
    def main_port(self) -> int:
        if "MASTER_PORT" in self._env:
            return int(self._env["MASTER_PORT"])
        return 20000 + self._int(JOB_ID) % 20000

    def world_size(self) -> int:
        return self._int(NUM_TASKS)

    def set_world_size(self, size: int) -> None:
        # the strategy's devices x num_nodes: the processes that exist must be that many, or the
        # rendezvous waits for ranks that will never come
        if size != self.world_size():
            raise ValueError(f"submitit's local executor started {self.world_size()} task(s) but the trainer asks for "
                             f"{size} processes (devices x num_nodes): set hydra.launcher.tasks_per_node to "
                             "trainer.devices (the local executor runs one node)")

    def global_rank(self) -> int:
        return self._int(GLOBAL_RANK)

    def set_global_rank(self, rank: int) -> None:
        pass  # the rank is submitit's (the strategy points rank_zero_only at global_rank() itself)

    def local_rank(self) -> int:
        return self._int(LOCAL_RANK)

    def node_rank(self) -> int:
        return self._int(NODE, 0)

    def validate_settings(self, num_devices: int, num_nodes: int) -> None:
        self.set_world_size(num_devices * num_nodes)
