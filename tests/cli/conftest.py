"""Fixtures of the command-line tests."""

import pytest
import yaml
from conftest import DIGITS_OVERRIDES

from flora_ray.config import config_to_dict, load_config


@pytest.fixture
def config_file(tmp_path):
    """A valid digits configuration file whose runs go under this test's directory."""
    cfg = load_config(None, [*DIGITS_OVERRIDES, f"run.output_dir={tmp_path / 'runs'}"])
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    return path
