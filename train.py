"""latentrl entry point: `python train.py agent=goal_hrl env=carracing` (see README.md)."""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import latentrl  # noqa: F401  (registers the config resolvers used in conf/config.yaml)
from latentrl.checkpoint import CheckpointError
from latentrl.config import ConfigError
from latentrl.train import run


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    try:
        return run(cfg, run_dir=hc.runtime.output_dir, overrides=list(hc.overrides.task))
    except (ConfigError, CheckpointError) as e:
        if hc.mode == RunMode.MULTIRUN:
            raise  # let the launcher mark this job failed
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
