"""Bad input gets a clear message naming the key and the fix, not a deep stack trace."""

import subprocess
import sys

import pytest

from conftest import ROOT, TINY, train_run
from latentrl.config import ConfigError


def cli(*overrides):
    proc = subprocess.run([sys.executable, "train.py", *overrides, "hydra.run.dir=/tmp/latentrl-bad-input"],
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
