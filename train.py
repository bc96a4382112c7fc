"""latentrl entry point: `python train.py agent=goal_hrl env=carracing` (see README.md).

Returns the final mean eval return, so Hydra sweepers (Optuna) can optimise it. Exit codes: 0 done or
stopped by SIGINT/SIGTERM with a checkpoint, 2 a setting is wrong or cannot be honoured here, 3 the
training diverged (NaN/inf; the last finite checkpoint is kept)."""

import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import latentrl  # noqa: F401  (registers the config resolvers used in conf/config.yaml)
from latentrl.checkpoint import CheckpointError
from latentrl.config import ConfigError, DivergenceError, resume_command
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
    except DivergenceError as e:  # its own exit code: the settings were valid, the training blew up
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


def run_sweep_job(cfg: DictConfig, hc) -> float | None:
    """A failing job must not stop or corrupt the rest of a sweep: log where to look, leave a FAILED
    marker in its directory, and return None, which Optuna records as a failed trial (a NaN makes
    hydra-optuna-sweeper 1.3 with optuna 2.10 tell FAIL *with* a value and abort the whole study)."""
    run_dir = Path(hc.runtime.output_dir)
    try:
        result = run(cfg, run_dir=run_dir, overrides=list(hc.overrides.task), launcher=hc.launcher)
    except Exception as e:  # noqa: BLE001 - any failure of one job is reported the same way
        (run_dir / "FAILED").write_text(traceback.format_exc())
        log.error("job %d (%s) failed: %s: %s. Traceback in %s, log in %s", hc.job.num, hc.job.override_dirname,
                  type(e).__name__, e, run_dir / "FAILED", run_dir / f"{hc.job.name}.log")
        return None
    if result is None:  # stopped by SIGINT/SIGTERM: the user wants the sweep to stop, not the next job to start
        log.warning("sweep stopped during job %d; its checkpoint is saved (%s); "
                    "later jobs were not started", hc.job.num, resume_command(run_dir))
        if os.environ.get(SWEEP_PID_VAR, str(os.getpid())) != str(os.getpid()):
            logging.shutdown()  # a worker process of a parallel sweep: end it, or its pool hands it the next job
            os._exit(0)
        raise SystemExit(0)
    return result


SWEEP_PID_VAR = "LATENTRL_SWEEP_PID"  # the sweep's parent process, inherited by its worker processes


def _children(pid: int) -> list[int]:
    """Direct child processes of pid (Linux /proc; elsewhere none are found)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _ignores(pid: int, signum: int) -> bool:
    """Whether process pid ignores signal signum (multiprocessing's resource tracker ignores SIGINT/SIGTERM)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigIgn:"):
                return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except OSError:
        pass
    return False


def stop_workers_with_the_sweep(grace_s: float = 120.0) -> None:
    """In a local parallel sweep (-m, joblib/loky) the jobs train in worker processes and the parent
    only waits; on SIGINT/SIGTERM the parent would die at once and leave its workers training as
    orphans. Instead it forwards the signal to them (each job stops at a safe point, saves a
    checkpoint, as a single run does, and ends its worker process), waits up to grace_s for them,
    then exits."""
    os.environ[SWEEP_PID_VAR] = str(os.getpid())

    def forward(signum, _frame):
        workers = [pid for pid in _children(os.getpid()) if not _ignores(pid, signum)]
        log.warning("received %s: stopping the sweep (%d worker processes asked to checkpoint and stop)",
                    signal.Signals(signum).name, len(workers))
        for pid in workers:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        while time.time() < deadline and any(pid in workers for pid in _children(os.getpid())):
            time.sleep(0.2)
        sys.exit(0)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)


def refuse_unwritable_output_dir(argv: list[str]) -> None:
    """Hydra creates the run directory before main() runs, so an unwritable one would end in Hydra's
    stack trace: check the directory the command line names (or ./outputs) first, in one line.
    Directories set in YAML instead are still checked by latentrl.train.run."""
    multirun = "-m" in argv or "--multirun" in argv
    key, target = ("hydra.sweep.dir" if multirun else "hydra.run.dir"), "outputs"
    for arg in argv:
        name, _, value = arg.partition("=")
        if name == key or (name == "resume" and value not in ("", "null", "None") and not multirun):
            key, target = name, value
    path = Path(target).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        print(f"error: {key}={target}: the run directory cannot be created or written ({path} is "
              f"{'not a directory' if not path.is_dir() else 'not writable'}); set {key} to a writable directory",
              file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    refuse_unwritable_output_dir(sys.argv[1:])
    if "-m" in sys.argv[1:] or "--multirun" in sys.argv[1:]:
        stop_workers_with_the_sweep()
    main()
