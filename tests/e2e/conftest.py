"""Fixtures the end-to-end modules share."""

import shutil

import pytest
from helpers import steps_on_disk, tiny_config

from negclip_jax.train import trainer


@pytest.fixture(scope="session")
def base_run(tmp_path_factory):
  """(workdir, train result) of one finished tiny run (checkpoints 2, 4, 6); read only."""
  workdir = tmp_path_factory.mktemp("base")
  out = trainer.train(tiny_config(), workdir)
  assert steps_on_disk(workdir) == [2, 4, 6]
  return workdir, out


@pytest.fixture
def run_copy(base_run, tmp_path):
  """A copy of `base_run`'s directory, for tests that change it."""
  copy = tmp_path / "run"
  shutil.copytree(base_run[0], copy)
  return copy
