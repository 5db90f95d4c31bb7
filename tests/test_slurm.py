"""SLURM: environment helpers (fast), and a real slurmctld/slurmd on this machine (slow tier): the sbatch
template completes, a signalled job checkpoints at a step boundary, requeues and resumes to the same
losses as an uninterrupted run; the submitit launcher configs compose and run, on that controller and
through submitit's local executor (no SLURM needed)."""
from __future__ import annotations

import csv
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lightning_sp.cluster import SubmititLocalEnvironment
from lightning_sp.slurm import SlurmJob, expand_hostlist, hpc_checkpoint_path, requeue_command

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------ fast: environment handling
def test_hostlists_expand_like_scontrol():
    assert expand_hostlist("gpu[01-03,7],login1") == ["gpu01", "gpu02", "gpu03", "gpu7", "login1"]
    assert expand_hostlist("node1") == ["node1"]
    assert expand_hostlist("a[8-10]-ib") == ["a8-ib", "a9-ib", "a10-ib"]


def test_a_two_node_job_gives_ranks_rendezvous_and_requeue_target():
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NTASKS_PER_NODE": "8(x2)",
           "SLURM_NTASKS": "16", "SLURM_JOB_NUM_NODES": "2", "SLURM_PROCID": "11", "SLURM_LOCALID": "3",
           "SLURM_NODEID": "1", "SLURM_RESTART_COUNT": "2"}
    job = SlurmJob.from_env(env)
    assert (job.world_size, job.global_rank, job.local_rank, job.node_rank) == (16, 11, 3, 1)
    assert job.main_address == "gpu07" and job.nodes == ["gpu07", "gpu08"]
    assert job.main_port == 20000 + (4242 * 10 + 2) % 20000
    assert job.main_port != SlurmJob.from_env(dict(env, SLURM_RESTART_COUNT="3")).main_port
    assert requeue_command(job) == ["scontrol", "requeue", "4242"]
    job.check_trainer(devices=8, num_nodes=2)
    with pytest.raises(ValueError, match="--ntasks-per-node=4 --nodes=2"):
        job.check_trainer(devices=4, num_nodes=2)
    array = SlurmJob.from_env(dict(env, SLURM_ARRAY_JOB_ID="4240", SLURM_ARRAY_TASK_ID="2"))
    assert requeue_command(array)[-1] == "4240_2"
    assert SlurmJob.from_env({}) is None


def test_the_next_hpc_checkpoint_is_numbered_after_the_newest(tmp_path):
    assert hpc_checkpoint_path(tmp_path).name == "hpc_ckpt_1.ckpt"
    (tmp_path / "hpc_ckpt_1.ckpt").touch()
    (tmp_path / "hpc_ckpt_9.ckpt").touch()
    assert hpc_checkpoint_path(tmp_path).name == "hpc_ckpt_10.ckpt"



# ------------------------------------------------------------------------------ fast: the requeue in one process
class _Exited(BaseException):
    """What os._exit does in these tests: the process would end here."""


def _requeue_trainer(root: Path, max_steps: int, signal_at: int | None, signals=None, **trainer_kw):
    """A one-process Trainer under a fake single-task SLURM job: SLURMRequeue, a CSV log in `root`, and a
    callback that sends this process SIGUSR1 once `signal_at` steps have run (after SLURMRequeue looked:
    it sees the flag one step later, like a signal that lands during a step)."""
    import lightning as L
    import torch
    from lightning.pytorch.loggers import CSVLogger
    from lightning_sp.slurm import SLURMRequeue

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            loss = self.layer(batch).pow(2).mean()
            self.log("train/loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            self.log("val/loss", self.layer(batch).pow(2).mean())

        def on_train_batch_end(self, outputs, batch, batch_idx):  # after the callbacks' hook, like CausalLM's
            self.log("train/after_callbacks", float(self.global_step))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.randn(32, 4, generator=torch.Generator().manual_seed(0)), batch_size=2)

        def val_dataloader(self):
            return torch.utils.data.DataLoader(torch.randn(4, 4), batch_size=2)

    class Signal(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == signal_at:
                os.kill(os.getpid(), signal.SIGUSR1)

    callbacks = [SLURMRequeue() if signals is None else SLURMRequeue(signals=signals), Signal()]
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, default_root_dir=root, callbacks=callbacks,
                        logger=CSVLogger(root, name="logs"), log_every_n_steps=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, **trainer_kw)
    return trainer, Module()


def _logged(version: Path) -> list[int]:
    path = version / "metrics.csv"
    if not path.exists():
        return []
    with open(path) as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.mark.parametrize("leaves_at", ["epoch_end", "validation", "next_batch"])
def test_the_requeued_step_is_logged_before_the_requeue_and_never_again(leaves_at, tmp_path, monkeypatch):
    """At the moment `scontrol requeue` runs - after which SLURM may kill the job at any time - the step the
    checkpoint holds is already in metrics.csv (Lightning logged it, the logger saved it), the checkpoint is
    on disk, and the SIGTERM that SLURM sends right away does not reach Lightning's handler (which runs a
    collective). The requeued job then logs the remaining steps: each step once over the two job starts.
    leaves_at: where the step's hook sequence reaches the requeue - the epoch's end (should_stop ends the
    loop), the validation that should_stop runs, or the next batch (min_steps keeps the loop going)."""
    import lightning_sp.slurm as slurm_mod
    for key, value in {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NUM_NODES": "1",
                       "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NAME": "test", "SLURM_PROCID": "0",
                       "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(key, value)
    kw = {"validation": {"val_check_interval": 1, "num_sanity_val_steps": 0},
          "next_batch": {"min_steps": 8, "limit_val_batches": 0}}.get(leaves_at, {"limit_val_batches": 0})
    trainer, module = _requeue_trainer(tmp_path, max_steps=8, signal_at=3, **kw)
    at_requeue = {}

    def scontrol(cmd, **_):
        assert cmd == ["scontrol", "requeue", "77"]
        at_requeue["logged"] = _logged(tmp_path / "logs" / "version_0")
        at_requeue["checkpoints"] = sorted(p.name for p in tmp_path.glob("hpc_ckpt_*.ckpt"))
        os.kill(os.getpid(), signal.SIGTERM)  # what SLURM does to every task as the requeue is accepted
        return subprocess.CompletedProcess(cmd, 0, "", "")

    def exit_(code):
        raise _Exited(code)

    monkeypatch.setattr(slurm_mod, "subprocess", type("FakeSubprocess", (), {"run": staticmethod(scontrol)}))
    monkeypatch.setattr(slurm_mod, "time", type("NoSleep", (), {"sleep": staticmethod(lambda s: None)}))
    monkeypatch.setattr(os, "_exit", exit_)
    with pytest.raises(_Exited):
        trainer.fit(module)
    # the flag came during step 3 (0-based: global_step 4 at its end); the checkpoint holds it
    assert at_requeue == {"logged": [0, 1, 2, 3], "checkpoints": ["hpc_ckpt_1.ckpt"]}, at_requeue
    assert not trainer.received_sigterm
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as f:
        last = [r for r in csv.DictReader(f) if r.get("train/loss")][-1]
    assert last["train/after_callbacks"] == "4.0"  # the whole step, the module's own on_train_batch_end included

    # the requeued job: same directory, Lightning resumes from hpc_ckpt_1.ckpt by itself (under SLURM)
    resumed, module = _requeue_trainer(tmp_path, max_steps=8, signal_at=None, **kw)
    resumed.fit(module)
    assert resumed.global_step == 8
    assert _logged(tmp_path / "logs" / "version_0") + _logged(tmp_path / "logs" / "version_1") == list(range(8))


def test_a_failed_requeue_stops_after_the_checkpoint_with_the_step_logged_once(tmp_path, monkeypatch):
    import lightning_sp.slurm as slurm_mod
    monkeypatch.setenv("SLURM_JOB_ID", "78")  # a job (SlurmJob) but Lightning not under srun: no auto-resume
    monkeypatch.delenv("SLURM_NTASKS", raising=False)

    def scontrol(cmd, **_):
        return subprocess.CompletedProcess(cmd, 1, "", "scontrol: error: Requested operation is presently disabled")

    monkeypatch.setattr(slurm_mod, "subprocess", type("FakeSubprocess", (), {"run": staticmethod(scontrol)}))
    sigterm = signal.getsignal(signal.SIGTERM)
    trainer, module = _requeue_trainer(tmp_path, max_steps=8, signal_at=3, limit_val_batches=0)
    with pytest.warns(UserWarning, match="failed .*stopping after the checkpoint"):
        trainer.fit(module)  # returns: no exit
    assert trainer.global_step == 4 and sorted(p.name for p in tmp_path.glob("hpc_ckpt_*.ckpt")) == ["hpc_ckpt_1.ckpt"]
    assert _logged(tmp_path / "logs" / "version_0") == [0, 1, 2, 3]
    assert signal.getsignal(signal.SIGTERM) == sigterm

def test_a_failed_requeue_gives_sigterm_back_to_its_training_handler(tmp_path, monkeypatch):
    """SIGTERM among SLURMRequeue's signals: after a failed requeue training goes on (min_steps), and
    SIGTERM is handled by SLURMRequeue again, not by the handler from before training."""
    import lightning as L

    import lightning_sp.slurm as slurm_mod
    monkeypatch.setenv("SLURM_JOB_ID", "79")
    monkeypatch.delenv("SLURM_NTASKS", raising=False)

    def scontrol(cmd, **_):
        return subprocess.CompletedProcess(cmd, 1, "", "scontrol: error: Requested operation is presently disabled")

    monkeypatch.setattr(slurm_mod, "subprocess", type("FakeSubprocess", (), {"run": staticmethod(scontrol)}))
    trainer, module = _requeue_trainer(tmp_path, max_steps=8, signal_at=3, signals=("SIGUSR1", "SIGTERM"),
                                       limit_val_batches=0, min_steps=8)
    requeue = next(c for c in trainer.callbacks if isinstance(c, slurm_mod.SLURMRequeue))
    seen = {}

    class Look(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            seen[trainer.global_step] = signal.getsignal(signal.SIGTERM)

    trainer.callbacks.append(Look())
    before = signal.getsignal(signal.SIGTERM)
    with pytest.warns(UserWarning, match="failed .*stopping after the checkpoint"):
        trainer.fit(module)
    assert trainer.global_step == 8 and 2 in seen and 7 in seen
    assert seen[2] == seen[7] == requeue._handler  # ours before and after the failed requeue
    assert signal.getsignal(signal.SIGTERM) == before  # and the one from before training once it ended


@pytest.mark.parametrize("launcher", ["slurm", "slurm_cpu"])
def test_submitit_launcher_configs_tie_tasks_and_nodes_to_the_trainer(launcher):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra/launcher={launcher}", "trainer.devices=8", "trainer.num_nodes=2"],
                      return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params["_target_"].endswith("SlurmLauncher")
    assert (params["tasks_per_node"], params["nodes"]) == (8, 2)
    assert params["gpus_per_node"] == (8 if launcher == "slurm" else None)
    assert params["signal_delay_s"] > 0 and params["max_num_timeout"] == 0
    assert params["additional_parameters"]["requeue"] is True


@pytest.mark.slow
def test_submitit_renders_the_expected_sbatch_parameters(tmp_path):
    """The sbatch file submitit writes for the `slurm` launcher, built the way the Hydra plugin builds its executor.
    submitit's SLURM executor wants `srun` on the machine: the SLURM client is installed as for the
    controller tests (slow tier: on a fresh machine that is an apt-get install)."""
    submitit = pytest.importorskip("submitit")
    from slurm_cluster import ensure_installed
    ensure_installed()
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer=gpu", "trainer.devices=8", "trainer.num_nodes=2"],
                      return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    params.pop("_target_")
    executor = submitit.AutoExecutor(cluster="slurm", folder=str(tmp_path), slurm_max_num_timeout=params.pop("max_num_timeout"))
    params.pop("submitit_folder")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    text = executor._executor._make_submission_file_text("python -m submitit.core._submit X", "uid")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --signal=USR2@120", "#SBATCH --requeue", "export MASTER_PORT="):
        assert line in text, (line, text)


# ------------------------------------------------------------------------------ fast: submitit's local executor
LOCAL_TASK = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_NTASKS": "4", "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
              "SUBMITIT_LOCAL_NODEID": "0", "SUBMITIT_LOCAL_GLOBALID": "2", "SUBMITIT_LOCAL_LOCALID": "2",
              "SUBMITIT_LOCAL_JOB_ID": "31337"}  # what submitit's local controller gives its third task of four


def test_a_local_submitit_task_gives_its_ranks_and_a_shared_rendezvous():
    env = SubmititLocalEnvironment(LOCAL_TASK)
    assert SubmititLocalEnvironment.detect(LOCAL_TASK) and env.creates_processes_externally
    assert (env.world_size(), env.global_rank(), env.local_rank(), env.node_rank()) == (4, 2, 2, 0)
    assert (env.main_address, env.main_port) == ("127.0.0.1", 20000 + 31337 % 20000)
    # every task of the job derives the same port; another job (a concurrent sweep job) another one
    rank0 = dict(LOCAL_TASK, SUBMITIT_LOCAL_GLOBALID="0", SUBMITIT_LOCAL_LOCALID="0")
    assert SubmititLocalEnvironment(rank0).main_port == env.main_port
    assert SubmititLocalEnvironment(dict(LOCAL_TASK, SUBMITIT_LOCAL_JOB_ID="31338")).main_port != env.main_port
    pinned = SubmititLocalEnvironment(dict(LOCAL_TASK, MASTER_ADDR="10.0.0.1", MASTER_PORT="29555"))
    assert (pinned.main_address, pinned.main_port) == ("10.0.0.1", 29555)
    env.set_world_size(4)
    env.set_global_rank(0)  # Lightning's value is ignored: the rank is submitit's
    assert env.global_rank() == 2
    with pytest.raises(ValueError, match="started 4 task.*asks for 8 processes.*tasks_per_node"):
        env.set_world_size(8)


def test_the_local_environment_is_only_detected_in_a_local_submitit_task():
    assert not SubmititLocalEnvironment.detect({})
    assert not SubmititLocalEnvironment.detect(dict(LOCAL_TASK, SUBMITIT_EXECUTOR="slurm"))
    assert not SubmititLocalEnvironment.detect({"SUBMITIT_EXECUTOR": "local"})  # the controller, not a task
    with pytest.raises(RuntimeError, match="SUBMITIT_LOCAL_GLOBALID is not set"):
        SubmititLocalEnvironment({}).global_rank()


@pytest.mark.parametrize("strategy", ["ulysses_ring", "ddp"])
def test_lightning_joins_a_local_submitit_task_instead_of_launching(strategy, monkeypatch):
    import lightning as L
    import torch
    import lightning_sp  # noqa: F401  (registers ulysses_ring)
    trainer = L.Trainer(accelerator="cpu", devices=4, strategy=strategy, plugins=[SubmititLocalEnvironment(LOCAL_TASK)],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert isinstance(trainer.strategy.cluster_environment, SubmititLocalEnvironment)
    assert (trainer.global_rank, trainer.local_rank, trainer.world_size) == (2, 2, 4)
    # the launcher runs the function in this process and starts no other (it would re-run sys.argv)
    launcher = trainer.strategy.launcher
    monkeypatch.setattr(launcher, "_call_children_scripts", lambda: pytest.fail("Lightning started processes"))
    threads = torch.get_num_threads()
    try:
        assert launcher.launch(lambda: "ran here") == "ran here"
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="tasks_per_node"):
        L.Trainer(accelerator="cpu", devices=2, strategy=strategy, plugins=[SubmititLocalEnvironment(LOCAL_TASK)])


def test_the_local_submitit_launcher_config_ties_tasks_to_the_trainer_and_adds_the_environment():
    from hydra.utils import instantiate
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=local_submitit", "trainer.devices=2"], return_hydra_config=True)
        plain = compose("train", overrides=["hydra/launcher=slurm_cpu"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params["_target_"].endswith("submitit_launcher.LocalLauncher")
    assert (params["tasks_per_node"], params["nodes"], params["gpus_per_node"]) == (2, 1, 2)
    plugins = [instantiate(p) for p in cfg.trainer.plugins]
    assert [type(p) for p in plugins] == [SubmititLocalEnvironment]
    assert "plugins" not in plain.trainer  # only this launcher adds it


# ------------------------------------------------------------------------------ slow: a real SLURM
@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    from slurm_cluster import LocalSlurm, SlurmUnavailable
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"), cpus=8)
    try:
        cluster.start()
    except SlurmUnavailable as error:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI needs a real SLURM for the SLURM tests: {error}")
        pytest.skip(f"no SLURM on this machine: {error}")
    yield cluster
    cluster.stop()


def _steps(run_dir: Path) -> list[tuple[int, float]]:
    """(step, train/loss) of every logged step, over all logger versions in order (one per job start)."""
    rows = []
    for version in sorted((run_dir / "logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1])):
        with open(version / "metrics.csv") as f:
            rows += [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(f) if r.get("train/loss")]
    return rows


def _submit(slurm, run_dir: Path, *overrides: str) -> str:
    run_dir.mkdir(parents=True)
    out = slurm.run("sbatch", "--parsable", f"--output={run_dir}/slurm.out", str(ROOT / "recipes/slurm/train_cpu.sbatch"),
                    *overrides, cwd=ROOT,
                    env={"RUN_DIR": str(run_dir), "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
                         "PYTHON": sys.executable})
    return out.stdout.strip().split(";")[0]


def _finished(state: str) -> bool:
    return state in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


def _log(run_dir):
    path = run_dir / "slurm.out"
    return path.read_text()[-4000:] if path.exists() else "(no output)"


STEPS = 8
JOB = ["experiment=cpu_smoke", f"trainer.max_steps={STEPS}"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sbatch_job_requeued_mid_run_resumes_to_the_uninterrupted_losses(slurm, tmp_path):
    """Two jobs at once (the node has 8 CPUs): one runs through, one is signalled after step 3."""
    beacon = tmp_path / "signalled" / "step"
    callbacks = f"+trainer.callbacks.beacon={{_target_:slurm_helpers.StepBeacon,path:{beacon},pause_s:3}}"
    plain = _submit(slurm, tmp_path / "plain", *JOB)
    signalled = _submit(slurm, tmp_path / "signalled", *JOB, callbacks)

    deadline = time.time() + 900
    while not (beacon.exists() and int(beacon.read_text() or 0) >= 3):
        state = slurm.job_field(signalled, "JobState")
        assert not _finished(state), f"job ended ({state}) before step 3:\n{_log(tmp_path / 'signalled')}"
        if time.time() > deadline:
            slurm.run("scancel", signalled, plain, check=False)
            pytest.fail(f"job {signalled} never reached step 3:\n{_log(tmp_path / 'signalled')}")
        time.sleep(0.5)
    slurm.run("scancel", "--signal=USR1", signalled)  # to the job's tasks, as --signal=USR1@T does

    slurm.wait(signalled, lambda s: slurm.job_field(signalled, "Restarts") not in ("", "0"), timeout=300)
    # SLURM holds a requeued job until its begin time (about 2 minutes after the requeue): bring it
    # forward so the test does not idle (a cluster would simply start it later)
    slurm.wait(signalled, lambda s: s == "PENDING" or _finished(s) or s == "RUNNING", timeout=120, poll=0.5)
    slurm.run("scontrol", "update", f"jobid={signalled}", "StartTime=now", check=False)
    for job, name in ((plain, "plain"), (signalled, "signalled")):
        state = slurm.wait(job, _finished, timeout=900, poll=2)
        assert state == "COMPLETED", f"{name} job {job}: {state}\n{_log(tmp_path / name)}"

    assert slurm.job_field(signalled, "Restarts") == "1"
    ckpts = sorted(p.name for p in (tmp_path / "signalled").glob("hpc_ckpt_*.ckpt"))
    assert ckpts == ["hpc_ckpt_1.ckpt"], ckpts
    reference, resumed = _steps(tmp_path / "plain"), _steps(tmp_path / "signalled")
    assert [s for s, _ in reference] == list(range(STEPS))
    # no step lost or repeated: the first run's steps, then the resumed run's, are 0..STEPS-1 once each
    assert [s for s, _ in resumed] == list(range(STEPS)), resumed
    assert len(list((tmp_path / "signalled" / "logs").glob("version_*"))) == 2  # really two job starts
    first_run = _steps_of(tmp_path / "signalled" / "logs" / "version_0")
    assert 3 <= len(first_run) < STEPS, first_run
    # float32 recipe, same ops in the same order: the curves agree to rounding
    for (step, want), (_, got) in zip(reference, resumed):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), (step, want, got)
    assert "restart 1" in (tmp_path / "signalled" / "slurm.out").read_text()


def _steps_of(version: Path) -> list[int]:
    with open(version / "metrics.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_submitit_job_on_the_local_controller_requeues_and_resumes(slurm, tmp_path):
    """Hydra's submitit launcher submits to the real controller (no accounting: submitit falls back to its
    result file); submitit's USR2 reaches SLURMRequeue, which requeues; the job resumes and completes."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    beacon = tmp_path / "step"
    callbacks = f"+trainer.callbacks.beacon={{_target_:slurm_helpers.StepBeacon,path:{beacon},pause_s:3}}"
    env = dict(slurm.env, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, str(ROOT / "recipes/train.py"), "-m", "hydra/launcher=slurm_cpu",
                             f"hydra.sweep.dir={tmp_path / 'sweep'}", *JOB, callbacks],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 600
        while not (beacon.exists() and int(beacon.read_text() or 0) >= 3):
            assert proc.poll() is None and time.time() < deadline, "the submitit job never reached step 3"
            time.sleep(0.5)
        job = slurm.run("squeue", "-h", "-o", "%i").stdout.split()[0]
        slurm.run("scancel", "--signal=USR2", job)
        slurm.wait(job, lambda s: slurm.job_field(job, "Restarts") not in ("", "0"), timeout=300)
        slurm.wait(job, lambda s: s in ("PENDING", "RUNNING") or _finished(s), timeout=120, poll=0.5)
        slurm.run("scontrol", "update", f"jobid={job}", "StartTime=now", check=False)
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            slurm.run("scancel", "--name=train", check=False)
    assert proc.returncode == 0, out[-4000:]
    assert slurm.job_field(job, "Restarts") == "1"
    run_dir = tmp_path / "sweep" / "0"
    assert sorted(p.name for p in run_dir.glob("hpc_ckpt_*.ckpt")) == ["hpc_ckpt_1.ckpt"]
    assert [s for s, _ in _steps(run_dir)] == list(range(STEPS))


# ------------------------------------------------------------------------------ slow: submitit's local executor
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_submitit_local_executor_runs_the_job_once_per_rank(tmp_path):
    """`-m hydra/launcher=local_submitit`: submitit's local executor starts the 4 ranks of the main job
    (cpu_smoke, gloo) and Lightning joins them: every rank ran exactly once, as submitit's child, and the
    job trained to the last step (previously Lightning re-ran submitit's entry point from every task)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    record, sweep = tmp_path / "processes", tmp_path / "sweep"
    callbacks = f"+trainer.callbacks.record={{_target_:slurm_helpers.ProcessRecord,folder:{record}}}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, str(ROOT / "recipes/train.py"), "-m", "hydra/launcher=local_submitit",
                             f"hydra.sweep.dir={sweep}", "experiment=cpu_smoke", "trainer.max_steps=4", callbacks],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # submitit's controller and tasks join this process group
    try:
        out, _ = proc.communicate(timeout=480)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left (a hung rank, the controller)
        except ProcessLookupError:
            pass
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(sweep.glob(".submitit/*/*_log.err")))
    assert proc.returncode == 0, f"{out[-3000:]}\n{logs}"

    # each rank ran once, in one of the processes submitit started (all children of its controller)
    ran = [json.loads(p.read_text()) for p in record.glob("*.json")]
    assert sorted(r["global_rank"] for r in ran) == [0, 1, 2, 3], (ran, logs)
    assert all(r["global_rank"] == r["local_rank"] == int(r["submitit_rank"]) and r["world_size"] == 4 for r in ran), ran
    assert len({r["ppid"] for r in ran}) == 1 and all(r["environment"] == "SubmititLocalEnvironment" for r in ran), ran

    # the job trained: steps 0..3 logged once, and every task handed submitit the last step's loss
    run_dir = sweep / "0"
    steps = _steps(run_dir)
    assert [s for s, _ in steps] == [0, 1, 2, 3], steps
    results = sorted(sweep.glob(".submitit/*/*_result.pkl"))
    assert len(results) == 4, results
    for path in results:
        outcome, job_return = pickle.loads(path.read_bytes())
        assert outcome == "success", (path, job_return)
        loss = job_return.return_value
        assert loss == pytest.approx(steps[-1][1], rel=1e-6) and loss < steps[0][1], (loss, steps)
