"""Sweeps through the real entry point (`train.py -m` in a subprocess, as users run it): local joblib
parallelism, a failing job isolated from the others, the Optuna preset with SQLite storage,
submitit's local executor, the sbatch script the SLURM preset produces, and (slow, optional) Ray."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from conftest import CONF, ROOT

# tiny Pendulum runs, one torch thread per job (the machine is shared)
SWEEP_TINY = ["env=pendulum", "agent=sac", "threads=1", "trainer.warmup_steps=100", "trainer.eval_every=0",
              "trainer.eval_episodes=1", "trainer.checkpoint_every=0", "trainer.log_every=50"]


def multirun(sweep_dir, *overrides, timeout=240):
    proc = subprocess.run([sys.executable, "train.py", "-m", *SWEEP_TINY, *overrides, f"hydra.sweep.dir={sweep_dir}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def job_dirs(sweep_dir):
    """Job directories in job order (Hydra names them <num>_<overrides>)."""
    return sorted((d for d in sweep_dir.iterdir() if d.is_dir() and d.name[0].isdigit()),
                  key=lambda d: int(d.name.split("_", 1)[0]))


def final_return(job_dir):
    return json.loads((job_dir / "results.json").read_text())["eval/return_mean"]


def test_joblib_sweep_runs_jobs_in_distinct_dirs(tmp_path):
    multirun(tmp_path, "seed=0,1", "trainer.total_steps=200")
    assert "JoblibLauncher" in OmegaConf.load(tmp_path / "multirun.yaml").hydra.launcher._target_
    dirs = job_dirs(tmp_path)
    assert len(dirs) == 2
    for seed, d in enumerate(dirs):
        cfg = OmegaConf.load(d / "config.yaml")
        assert cfg.seed == seed and cfg.threads == 1 and cfg.trainer.progress is False
        assert json.loads((d / "results.json").read_text())["step"] == 200
        assert (d / "checkpoints" / "last.pt").exists() and any((d / "tb").iterdir())
    assert final_return(dirs[0]) != final_return(dirs[1]), "two seeds, two different runs"


def test_failing_job_leaves_the_others_complete(tmp_path):
    proc = multirun(tmp_path, "trainer.total_steps=150,-5")
    good, bad = job_dirs(tmp_path)
    assert json.loads((good / "results.json").read_text())["step"] == 150
    assert not (good / "FAILED").exists()
    assert "total_steps" in (bad / "FAILED").read_text() and not (bad / "results.json").exists()
    assert "failed" in proc.stdout + proc.stderr  # the log names the job and where to look


def test_optuna_sweep_maximises_and_stores_in_sqlite(tmp_path):
    import optuna

    multirun(tmp_path, "hydra/sweeper=optuna_max", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2",
             "hydra.sweeper.sampler.seed=0", "trainer.total_steps=150", "agent.lr=tag(log, interval(1e-4, 1e-3))")
    db = tmp_path / "optuna.db"
    assert db.exists()
    study = optuna.load_study(study_name="latentrl", storage=f"sqlite:///{db}")
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    trials = sorted(study.trials, key=lambda t: t.number)
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    # each trial's objective is the final eval return its run reported
    for trial, d in zip(trials, job_dirs(tmp_path)):
        assert math.isclose(trial.value, final_return(d))
        assert math.isclose(trial.params["agent.lr"], OmegaConf.load(d / "config.yaml").agent.lr)
    best = OmegaConf.load(tmp_path / "optimization_results.yaml")
    assert best.best_value == max(t.value for t in trials)


def test_optuna_sweep_survives_a_failing_trial(tmp_path):
    import optuna

    # the random sampler with seed 0 draws -5 (invalid: the job raises) and then 101
    multirun(tmp_path, "hydra/sweeper=optuna_max", "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=0",
             "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2", "trainer.total_steps=choice(101, -5)")
    study = optuna.load_study(study_name="latentrl", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    states = {t.params["trainer.total_steps"]: t.state for t in study.trials}
    assert states == {-5: optuna.trial.TrialState.FAIL, 101: optuna.trial.TrialState.COMPLETE}


def test_submitit_local_runs_one_job(tmp_path):
    multirun(tmp_path, "hydra/launcher=submitit_local", "trainer.total_steps=150")
    (d,) = job_dirs(tmp_path)
    assert json.loads((d / "results.json").read_text())["step"] == 150
    assert any((tmp_path / ".submitit").iterdir()), "submitit keeps its job logs in <sweep_dir>/.submitit"


def test_slurm_preset_renders_a_valid_sbatch_script(tmp_path, monkeypatch):
    """No cluster here: build the sbatch script exactly as hydra-submitit-launcher would, with a fake
    `srun` on PATH (submitit looks for one), and check our keys arrive as the right SLURM options."""
    import submitit
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    (tmp_path / "srun").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                          return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    launcher = OmegaConf.to_container(cfg.hydra.launcher)
    assert launcher["_target_"].endswith("SlurmLauncher")
    # the plugin's own mapping (SlurmLauncher.launch): base keys as they are, the rest with a slurm_ prefix
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path / "submitit", slurm_max_num_timeout=0)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in launcher.items()
                                  if k not in {"_target_", "submitit_folder", "max_num_timeout", "name"}})
    script = executor._executor._make_submission_file_text("python train.py", "uid")
    for option in ["--partition=gpu", "--cpus-per-task=4", "--mem=16GB", "--time=1440", "--signal=USR2@120"]:
        assert f"#SBATCH {option}\n" in script
    assert "gpus" not in script and "gres" not in script  # no GPU requested unless gpus_per_node is set


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None or
                    importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None,
                    reason="optional extra: pip install -e '.[ray]'")
def test_ray_sweep_on_a_local_instance(tmp_path):
    multirun(tmp_path, "hydra/launcher=ray_cluster", "hydra.launcher.ray.init.num_cpus=2", "seed=0,1",
             "trainer.total_steps=150", timeout=400)
    dirs = job_dirs(tmp_path)
    assert len(dirs) == 2 and all((d / "results.json").exists() for d in dirs)


def test_sweep_subdir_is_cut_with_a_hash_only_when_too_long():
    from latentrl.config import SWEEP_SUBDIR_MAX, _sweep_subdir
    assert _sweep_subdir(3, "seed=1,agent.lr=0.001") == "3_seed=1,agent.lr=0.001"  # short names as Hydra's
    long_a = ",".join(f"agent.key_{i}=value_{i}" for i in range(30)) + ",seed=1"
    long_b = long_a[:-1] + "2"  # differs only past the cut
    a, b = _sweep_subdir(0, long_a), _sweep_subdir(0, long_b)
    assert len(a.encode()) <= SWEEP_SUBDIR_MAX and a.startswith("0_agent.key_0=value_0")
    assert a != b, "the hash keeps jobs whose overrides differ only past the cut apart"
    assert _sweep_subdir(0, long_a) == a, "the same overrides name the same directory (resume finds it)"


def test_sweep_with_many_overrides_does_not_exceed_the_file_name_limit(tmp_path):
    # 9 agent keys beside SWEEP_TINY's: Hydra's <num>_<overrides> name would pass 255 bytes (OSError)
    many = ["agent.gamma=0.99", "agent.tau=0.005", "agent.init_temperature=1.0", "agent.actor_update_every=1",
            "agent.target_update_every=1", "agent.critic_layernorm=false", "agent.hidden_dims=[64,64]",
            "agent.batch_size=64", "agent.augment_pad=4"]
    assert len(",".join(SWEEP_TINY + many + ["seed=0"])) > 255
    multirun(tmp_path, "seed=0,1", "trainer.total_steps=120", *many)
    dirs = job_dirs(tmp_path)
    assert len(dirs) == 2 and all(len(d.name.encode()) <= 200 for d in dirs)
    assert [OmegaConf.load(d / "config.yaml").seed for d in dirs] == [0, 1]
