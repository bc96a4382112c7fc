"""latentrl entry point: `python train.py agent=goal_hrl env=carracing` (see README.md).

Returns the final mean eval return, so Hydra sweepers (Optuna) can optimise it."""

import logging
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import latentrl  # noqa: F401  (registers the config resolvers used in conf/config.yaml)
from latentrl.checkpoint import CheckpointError
from latentrl.config import ConfigError
from latentrl.train import run

log = logging.getLogger("latentrl")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        return run_sweep_job(cfg, hc)
    try:
        return run(cfg, run_dir=hc.runtime.output_dir, overrides=list(hc.overrides.task))
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run_sweep_job(cfg: DictConfig, hc) -> float | None:
    """A failing job must not stop or corrupt the rest of a sweep: log where to look, leave a FAILED
    marker in its directory, and return None, which Optuna records as a failed trial (a NaN makes
    hydra-optuna-sweeper 1.3 with optuna 2.10 tell FAIL *with* a value and abort the whole study)."""
    run_dir = Path(hc.runtime.output_dir)
    try:
        return run(cfg, run_dir=run_dir, overrides=list(hc.overrides.task), launcher=hc.launcher)
    except Exception as e:  # noqa: BLE001 - any failure of one job is reported the same way
        (run_dir / "FAILED").write_text(traceback.format_exc())
        log.error("job %d (%s) failed: %s: %s. Traceback in %s, log in %s", hc.job.num, hc.job.override_dirname,
                  type(e).__name__, e, run_dir / "FAILED", run_dir / f"{hc.job.name}.log")
        return None


if __name__ == "__main__":
    main()
