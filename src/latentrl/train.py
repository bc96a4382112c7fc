"""Entry point behind the root train.py: resolve the run directory and config (fresh or resumed),
validate, then hand over to the Trainer."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from latentrl.config import ConfigError, check_machine, check_output_dir, to_plain, usable_cores, validate

log = logging.getLogger("latentrl")

# keys a resumed run may change from the command line; anything else would make it another experiment
RESUME_SAFE_KEYS = {"resume", "device", "threads", "trainer.total_steps", "trainer.eval_every",
                    "trainer.eval_episodes", "trainer.checkpoint_every", "trainer.log_every", "trainer.progress",
                    "trainer.save_buffer", "trainer.log_eval_video", "agent.compile"}


def _override_key(override: str) -> str:
    key = override.split("=", 1)[0].lstrip("+~")
    return key


def resume_config(cli_cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The resumed run's own saved config, with the command line's resume-safe overrides on top."""
    run_dir = Path(str(cli_cfg.resume))
    saved = run_dir / "config.yaml"
    if not saved.exists():
        raise ConfigError(f"resume={run_dir}: no config.yaml there. Pass a run directory made by train.py "
                          "(outputs/<date>/<time>_<agent>_<env>_s<seed>_<id>)")
    cfg = OmegaConf.load(saved)
    for ov in overrides:
        key = _override_key(ov)
        if key.startswith("hydra.") or key.startswith("hydra/"):
            continue
        if key not in RESUME_SAFE_KEYS:
            raise ConfigError(f"cannot change '{key}' when resuming {run_dir}: a resumed run keeps its saved config. "
                              f"Start a new run for a different setting; resume accepts {sorted(RESUME_SAFE_KEYS)}")
        OmegaConf.update(cfg, key, OmegaConf.select(cli_cfg, key), force_add=True)
    cfg.resume = str(run_dir)
    return cfg


# env keys that change how frames are produced, not which: a branch may differ from its source in them
BRANCH_FREE_ENV_KEYS = {"lazy_render", "vector_mode"}


def check_branch(cfg: DictConfig, source: Path) -> None:
    """branch_from: refuse, before anything is built, a source without a checkpoint or one whose seed or
    env differ from this config (the branch replays the source's running episode from them). Env keys
    the source's code did not have yet are not compared."""
    if not (source / "checkpoints" / "last.pt").exists() or not (source / "config.yaml").exists():
        raise ConfigError(f"branch_from={source}: no config.yaml and checkpoints/last.pt there. Pass a run "
                          "directory made by train.py that reached a checkpoint")
    saved = OmegaConf.to_container(OmegaConf.load(source / "config.yaml"))
    mine = to_plain(cfg)
    if saved.get("seed") != mine.get("seed"):
        raise ConfigError(f"branch_from={source}: 'seed' differs from the source run's ({saved.get('seed')!r}): "
                          f"set seed={saved.get('seed')}, as in its config.yaml")
    for key, value in (saved.get("env") or {}).items():
        if key not in BRANCH_FREE_ENV_KEYS and key in mine["env"] and mine["env"][key] != value:
            raise ConfigError(f"branch_from={source}: 'env.{key}' differs from the source run's ({value!r}): set "
                              f"env.{key} as in its config.yaml (a branch replays the source's running episode)")


def sweep_job_defaults(cfg: DictConfig, launcher) -> None:
    """Inside a sweep: torch threads per job so that jobs x threads <= cores (unless `threads` is
    set), and no progress bars from parallel jobs."""
    import os

    cores = os.cpu_count() or 1
    if cfg.get("threads") is None:
        per_job = launcher.get("cpus_per_task") if launcher is not None else None
        if not per_job and launcher is not None:  # Ray: the CPUs each run reserves (ray.remote.num_cpus)
            per_job = OmegaConf.select(launcher, "ray.remote.num_cpus")
        if not per_job:
            n_jobs = launcher.get("n_jobs", 1) if launcher is not None else 1
            n_jobs = cores if n_jobs in (None, -1) or n_jobs < 1 else n_jobs
            per_job = max(1, cores // n_jobs)
        cfg.threads = min(int(per_job), usable_cores())  # derived, not asked for: never more than this machine has
    cfg.trainer.progress = False


def run(cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None, launcher=None) -> float | None:
    """Train one run; returns the final mean eval return (the value Hydra sweepers optimise).
    `launcher` is given inside a multirun (the Hydra launcher config)."""
    from latentrl.trainer import Trainer  # imported late: keeps `train.py --help` fast

    resuming = cfg.get("resume") not in (None, "")
    branch_from = cfg.get("branch_from")
    if resuming and branch_from not in (None, "") and any(_override_key(o) == "branch_from" for o in overrides or []):
        raise ConfigError("resume and branch_from both set: resume continues a run in place, branch_from starts "
                          "a new one from another's checkpoint; keep one")
    if resuming:  # a resumed branch continues from its own checkpoints, not its source's
        cfg = resume_config(cfg, overrides or [])
        run_dir = Path(str(cfg.resume))
        branch_from = None
    run_dir = Path(run_dir)
    if launcher is not None:
        sweep_job_defaults(cfg, launcher)
    validate(cfg)
    if branch_from not in (None, ""):
        check_branch(cfg, Path(str(branch_from)))
    check_machine(cfg)
    check_output_dir(run_dir, "resume" if resuming else "hydra.sweep.dir" if launcher is not None else "hydra.run.dir")
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    log.info("run directory: %s", run_dir.resolve())
    results = Trainer(cfg, run_dir, resume=resuming, branch_from=branch_from or None).train()
    return None if results is None else results["eval/return_mean"]
