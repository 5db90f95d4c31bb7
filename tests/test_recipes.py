"""conf/ and recipes/: every config composes and instantiates; sequence-parallel prefill and training
under UlyssesRingStrategy match one process; the main job trains (slow tier)."""
from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import lightning as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import OverrideParseException
from hydra.utils import get_class, instantiate
from omegaconf import open_dict
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

import lightning_sp
from lightning_sp.app.data import LMDataModule, LongRangeTask
from lightning_sp.app.lm import CausalLM
from lightning_sp.app.models import LlamaConfig, LlamaForCausalLM
from lightning_sp.launch.slurm import SLURMRequeue

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# a group's default.yaml is the base its options extend (conf/trainer/default.yaml), not an option
GROUPS = {g: sorted(p.stem for p in (CONF / g).glob("*.yaml") if p.stem != "default")
          for g in ("trainer", "strategy", "model", "data")}
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _recipe():
    """recipes/train.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("recipe_train", ROOT / "recipes" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compose(overrides, tmp_path):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)  # what @hydra.main sets for a run
    HydraConfig.instance().set_config(cfg)
    return cfg


# every option of every group on its own, then every experiment with every data option
CASES = ([[f"{g}={o}"] for g, opts in GROUPS.items() for o in opts]
         + [[f"experiment={e}", f"data={d}"] for e in EXPERIMENTS for d in GROUPS["data"]])


@pytest.mark.parametrize("overrides", CASES, ids=" ".join)
def test_every_config_composes_and_instantiates(overrides, tmp_path):
    text = tmp_path / "a.jsonl"  # one document longer than the longest experiment's sequence
    text.write_text('{"text": "' + "hello " * 90_000 + '"}\n')
    if "data=text" in overrides:
        overrides = overrides + [f"data.train.paths=[{text}]"]
    cfg = _compose(overrides, tmp_path)
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        cfg.trainer.accelerator = "cpu"  # the GPU configs are checked on CPU; everything else as written
    with torch.device("meta"):  # large shapes never allocate
        model = instantiate(cfg.model)()
    assert isinstance(model, LlamaForCausalLM)
    assert sum(p.numel() for p in model.parameters()) == model.config.num_params()

    trainer, module, data = _recipe().build(cfg)  # what the recipe builds before trainer.fit
    assert isinstance(data, LMDataModule) and len(data.train) > 0
    assert data.train.seq_len == cfg.data.train.seq_len
    assert isinstance(module, CausalLM)
    assert isinstance(trainer, pl.Trainer) and trainer.max_steps == cfg.trainer.max_steps
    assert type(trainer.strategy) is get_class(cfg.strategy._target_)
    assert isinstance(trainer.logger, CSVLogger) and trainer.logger.save_dir == str(tmp_path)
    # checkpointing and the SLURM requeue come from trainer/default.yaml into every trainer option
    assert sum(isinstance(c, SLURMRequeue) for c in trainer.callbacks) == 1
    assert trainer.checkpoint_callback.dirpath == str(tmp_path / "checkpoints")
    assert trainer.checkpoint_callback.save_last and cfg.ckpt_path is None
    if isinstance(trainer.strategy, lightning_sp.UlyssesRingStrategy) and overrides[0] != "trainer=gpu":
        # whole runs (the defaults, every experiment) must be consistent; trainer=gpu alone keeps the
        # CPU strategy's 2 x 2 degrees and needs strategy.ulysses_degree/ring_degree set to its devices
        degrees = cfg.strategy.ulysses_degree * cfg.strategy.ring_degree
        assert cfg.trainer.devices * cfg.trainer.num_nodes % degrees == 0, "degrees must divide the world"
        assert cfg.model.config.num_heads % cfg.strategy.ulysses_degree == 0


def test_the_fsdp_strategy_extends_the_sequence_parallel_one(tmp_path):
    plain = _compose(["strategy=ulysses_ring"], tmp_path).strategy
    fsdp = _compose(["strategy=ulysses_ring_fsdp"], tmp_path).strategy
    assert fsdp._target_ == "lightning_sp.UlyssesRingFSDPStrategy" and (fsdp.ulysses_degree, fsdp.ring_degree) == (2, 1)
    assert {k: v for k, v in fsdp.items() if k not in ("_target_", "ring_degree")} == {
        k: v for k, v in plain.items() if k not in ("_target_", "ring_degree")}


def test_trainer_callbacks_are_named_so_one_can_be_changed_or_dropped(tmp_path):
    cfg = _compose(["trainer.callbacks.model_checkpoint.every_n_train_steps=7",
                    "trainer.callbacks.slurm_requeue=null"], tmp_path)
    trainer = _recipe().build(cfg)[0]
    assert not any(isinstance(c, SLURMRequeue) for c in trainer.callbacks)
    assert trainer.checkpoint_callback._every_n_train_steps == 7
    cfg = _compose(["+trainer.callbacks.summary={_target_:lightning.pytorch.callbacks.ModelSummary,max_depth:2}",
                    "trainer.callbacks.model_checkpoint=null", "trainer.enable_checkpointing=false"], tmp_path)
    trainer = _recipe().build(cfg)[0]
    assert trainer.checkpoint_callback is None and any(isinstance(c, SLURMRequeue) for c in trainer.callbacks)
    assert any(isinstance(c, ModelSummary) and c._max_depth == 2 for c in trainer.callbacks)


@pytest.mark.parametrize("override", ["ckpt_path='/x/epoch=0-step=100.ckpt'", r"ckpt_path=/x/epoch\=0-step\=100.ckpt"])
def test_ckpt_path_with_equals_signs_is_given_quoted_or_escaped(override, tmp_path):
    """docs/recipes.md's quoting: Hydra's override grammar reads an unquoted `=` as a second assignment."""
    assert _compose([override], tmp_path).ckpt_path == "/x/epoch=0-step=100.ckpt"
    assert _compose(["ckpt_path=last"], tmp_path).ckpt_path == "last"
    with pytest.raises(OverrideParseException):
        _compose(["ckpt_path=/x/epoch=0-step=100.ckpt"], tmp_path)


def test_a_requeued_slurm_job_resumes_from_its_hpc_checkpoint_not_from_ckpt_path(tmp_path, monkeypatch):
    recipe = _recipe()
    cfg = _compose(["ckpt_path=last"], tmp_path)
    trainer = recipe.build(cfg)[0]
    for var in ("SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "hpc_ckpt_1.ckpt").touch()
    assert recipe.resume_path(cfg, trainer) == "last"  # not under SLURM: the option as given
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    assert recipe.resume_path(cfg, trainer) is None  # Lightning then takes the newest hpc_ckpt_<n>.ckpt
    (tmp_path / "hpc_ckpt_1.ckpt").unlink()
    assert recipe.resume_path(cfg, trainer) == "last"  # the first job of a SLURM run


def test_the_large_experiment_is_the_documented_shape(tmp_path):
    cfg = _compose(["experiment=h100x2_128k"], tmp_path)
    assert cfg.data.train.seq_len == 131072 and cfg.trainer.devices == 2 and cfg.trainer.accelerator == "gpu"
    assert cfg.strategy._target_ == "lightning_sp.UlyssesRingFSDPStrategy"
    assert instantiate(cfg.model.config).num_params() == 1_235_814_400  # Llama-3.2-1B


# ----------------------------------------------------------------------- runs on a gloo world


def _module(seed=0, tie=False):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, init_std=0.1, tie_word_embeddings=tie)
    return CausalLM(LlamaForCausalLM(config, loss_chunk_size=50), lr=3e-3, warmup_steps=2)


def _trainer(strategy, devices, **kw):
    return pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, precision="64-true", logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0, **kw)


def _sp_strategy(fsdp=False):
    cls = lightning_sp.UlyssesRingFSDPStrategy if fsdp else lightning_sp.UlyssesRingStrategy
    return cls(ulysses_degree=2, ring_degree=2, ring_impl="zigzag")


def _prefill(prompt_length: int, fsdp=False):
    """On every rank: trainer.predict under the strategy vs the model on the whole prompt."""
    import torch.distributed as dist
    module = _module(tie=fsdp)
    ids = torch.randint(0, 264, (1, prompt_length), generator=torch.Generator().manual_seed(7))
    model = module.model.double()
    with torch.no_grad():
        want = model.logits(model(ids))[:, -1]
    got = _trainer(_sp_strategy(fsdp), dist.get_world_size()).predict(
        module, DataLoader([{"input_ids": ids, "prompt_length": prompt_length}], batch_size=None))[0]
    err = ((got - want).norm() / want.norm()).item()
    assert err < 1e-10, f"prefill logits differ from one process: {err}"
    return err


@pytest.mark.timeout(200)
@pytest.mark.parametrize("fsdp", [False, True])
def test_sequence_parallel_prefill_gives_the_one_process_next_token_logits(worlds, fsdp):
    worlds(4).run(_prefill, 37, fsdp, timeout=150)  # 37 tokens: padded to the layout's multiple of 8


class _Losses(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def _fit(strategy, devices, steps, tie=False):
    data = LMDataModule(LongRangeTask("copy", seq_len=48, num_samples=4 * steps, alphabet=8), batch_size=4,
                        shuffle=False)
    record = _Losses()
    # dp = 1: every rank reads the same batches in dataset order (Lightning's sampler would reshuffle)
    _trainer(strategy, devices, max_steps=steps, callbacks=[record], use_distributed_sampler=False).fit(
        _module(tie=tie), data)
    return record.losses


def _fit_sp(steps, fsdp=False):
    import torch.distributed as dist
    return _fit(_sp_strategy(fsdp), dist.get_world_size(), steps, tie=fsdp)


@pytest.mark.timeout(300)
def test_fsdp_training_with_tied_embeddings_matches_one_process(worlds):
    """CausalLM under UlyssesRingFSDPStrategy with a tied LM head (the llama_1b shape's setting)."""
    want = _fit("auto", 1, 3, tie=True)
    got = worlds(4).run(_fit_sp, 3, True, timeout=250)
    for rank_losses in got:
        diffs = [abs(a - b) / b for a, b in zip(rank_losses, want)]
        assert len(rank_losses) == 3 and max(diffs) < 1e-8, f"FSDP losses {rank_losses} vs one process {want}"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sequence_parallel_training_follows_the_one_process_loss_curve(worlds):
    steps = 40
    want = _fit("auto", 1, steps)
    got = worlds(4).run(_fit_sp, steps, timeout=500)
    assert want[-1] < want[0] / 1.5, f"the task must be learnt for the comparison to mean something: {want}"
    for rank_losses in got:
        assert len(rank_losses) == steps
        diffs = [abs(a - b) / b for a, b in zip(rank_losses, want)]
        assert max(diffs) < 1e-8, f"sequence-parallel losses {rank_losses} differ from one process {want}"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_main_job_trains_the_tiny_model_with_a_falling_loss(tmp_path):
    start = time.perf_counter()
    run = subprocess.run([sys.executable, str(ROOT / "recipes" / "train.py"), f"hydra.run.dir={tmp_path}",
                          "predict_after_fit=true"], cwd=tmp_path, capture_output=True, text=True, timeout=540)
    seconds = time.perf_counter() - start
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "logs" / "version_0" / "metrics.csv")))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) >= 50 and losses[-1] < losses[0] / 5, f"loss did not fall: {losses}"
    assert any(r.get("train/tokens_per_s") for r in rows)
    assert "predicted next token" in run.stdout
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()  # checkpointing is on by default
    print(f"main job: {seconds:.0f} s, loss {losses[0]:.3f} -> {losses[-1]:.4f}")


def _run_recipe(run_dir, *overrides, timeout=400):
    run = subprocess.run([sys.executable, str(ROOT / "recipes" / "train.py"), f"hydra.run.dir={run_dir}", *overrides],
                         cwd=run_dir.parent, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def _logged_losses(version_dir) -> dict[int, float]:
    with open(version_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_recipe_resumes_from_a_checkpoint_file_and_from_last_with_other_splits(tmp_path):
    """ulysses 2 x ring 2 saves epoch=0-step=4.ckpt; ulysses 1 x ring 4 resumes from that file (a name
    with `=`, quoted for Hydra) to step 8, saving last.ckpt; ulysses 4 x ring 1 resumes with ckpt_path=last
    to step 10. Each resumed run logs the steps after the checkpoint's and the uninterrupted run's losses."""
    smoke = ["experiment=cpu_smoke", "trainer.callbacks.model_checkpoint.every_n_train_steps=4"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _run_recipe(full, *smoke, "trainer.max_steps=10", "trainer.callbacks.model_checkpoint.save_top_k=-1")
    step4 = full / "checkpoints" / "epoch=0-step=4.ckpt"
    assert sorted(p.name for p in step4.parent.iterdir()) == ["epoch=0-step=4.ckpt", "epoch=0-step=8.ckpt", "last.ckpt"]
    want = _logged_losses(full / "logs" / "version_0")
    assert sorted(want) == list(range(10))

    _run_recipe(resumed, *smoke, "trainer.max_steps=8", "strategy.ulysses_degree=1", "strategy.ring_degree=4",
                f"ckpt_path='{step4}'")
    got = _logged_losses(resumed / "logs" / "version_0")
    assert sorted(got) == [4, 5, 6, 7], f"training did not continue from step 4: {got}"
    _run_recipe(resumed, *smoke, "trainer.max_steps=10", "strategy.ulysses_degree=4", "strategy.ring_degree=1",
                "ckpt_path=last")
    got.update(_logged_losses(resumed / "logs" / "version_1"))
    assert sorted(got) == list(range(4, 10)), f"ckpt_path=last did not continue from step 8: {got}"
    # float32 with another split: the reductions run in another order, so the curves agree to rounding
    for step, loss in got.items():
        assert loss == pytest.approx(want[step], rel=1e-4), (step, loss, want[step])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_mixed_layer_experiment_trains_on_cpu(tmp_path):
    """experiment=cpu_mixed_layers: a sliding layer and a global one, 4 CPU processes (ulysses 2 x
    ring 2); the loss falls from about ln 264."""
    _run_recipe(tmp_path / "run", "experiment=cpu_mixed_layers", "trainer.max_steps=30")
    losses = _logged_losses(tmp_path / "run" / "logs" / "version_0")
    first, last = losses[min(losses)], losses[max(losses)]
    assert last < first - 1.0, losses
