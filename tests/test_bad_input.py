"""Bad input gets a clear message naming the key and the fix, not a deep stack trace."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, train_run
from latentrl.config import ConfigError


def cli(*overrides):
    run_dir = f"/tmp/latentrl-bad-input-{os.getpid()}"  # one per pytest worker process
    proc = subprocess.run([sys.executable, "train.py", *overrides, f"hydra.run.dir={run_dir}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("override,expected", [
    ("trainer.total_steps=abc", "trainer.total_steps"),
    ("trainer.total_steps=-5", "'trainer.total_steps' must be >= 0"),
    ("trainer.updates_per_step=-1", "'trainer.updates_per_step' must be >= 0"),
    ("env.action_repeat=0", "'env.action_repeat' must be >= 1"),
    ("+trainer.total_stepz=5", "trainer.total_stepz"),
    ("seed=-1", "'seed' must be a non-negative integer"),
])
def test_invalid_values_name_the_key(tmp_path, override, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        train_run(["env=pendulum", "agent=sac", *TINY, override], tmp_path)


def test_cli_wrong_type_is_one_clear_line():
    code, out = cli("env=pendulum", "trainer.total_steps=abc")
    assert code == 2
    assert "error: invalid config value at 'trainer.total_steps'" in out
    assert "Traceback" not in out


def test_cli_unknown_option_and_group_choice():
    code, out = cli("trainer.no_such_key=1")
    assert code != 0 and "no_such_key" in out and "Traceback" not in out
    code, out = cli("agent=no_such_agent")
    assert code != 0 and "no_such_agent" in out and "sac" in out  # Hydra lists the available options


def test_cli_pixel_encoder_on_vector_env():
    code, out = cli("env=pendulum", "agent=sac", "encoder=cnn", *TINY)
    assert code == 2 and "use encoder=mlp" in out and "Traceback" not in out


def test_unknown_agent_key_names_the_group(tmp_path):
    with pytest.raises(ConfigError, match="agent config does not fit"):
        train_run(["env=pendulum", "agent=sac", *TINY, "+agent.learning_rate=1e-3"], tmp_path)


# -- settings this machine cannot honour: refused at start-up, one line naming the key (issue 11)
def cores() -> int:
    from latentrl.config import usable_cores
    return usable_cores()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_names_device(tmp_path):
    with pytest.raises(ConfigError, match="device=cuda: CUDA is not available"):
        train_run(["env=pendulum", "agent=sac", *TINY, "device=cuda"], tmp_path)
    code, out = cli("env=pendulum", "agent=sac", *TINY, "device=cuda")
    assert code == 2 and "error: device=cuda" in out and "Traceback" not in out


@pytest.mark.parametrize("override,expected", [
    ("device=cuda:99", "device=cuda:99"),  # no such index (or no CUDA at all): either way it names the key
    ("device=tpu", "'device' must be auto, cpu, cuda or cuda:N"),
    ("threads=0", "'threads' must be null or a positive integer"),
])
def test_unusable_device_or_threads_name_the_key(tmp_path, override, expected):
    with pytest.raises(ConfigError, match=expected):
        train_run(["env=pendulum", "agent=sac", *TINY, override], tmp_path)


def test_more_threads_than_cores_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=f"threads={cores() + 1}: this process may use {cores()} CPU core"):
        train_run(["env=pendulum", "agent=sac", *TINY, f"threads={cores() + 1}"], tmp_path)


def test_unwritable_output_dir_names_the_key(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match="hydra.run.dir=.*cannot be written"):
        train_run(["env=pendulum", "agent=sac", *TINY], tmp_path / "a_file" / "run")
    proc = subprocess.run([sys.executable, "train.py", "env=pendulum", f"hydra.run.dir={tmp_path / 'a_file' / 'run'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "error: hydra.run.dir=" in out and "Traceback" not in out
