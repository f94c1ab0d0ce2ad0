"""Every eval.py protocol (single, multiscale, fewshot) gives the scores of
one device on 8 simulated devices (in-process) and on 2 processes x 4
devices (eval.py subprocesses joined by --coordinator_address).

The model is the tiny LSeg with random weights (scores of no meaning, but
every pixel's prediction counts); the data the tiny lseg_shapes build and a
fake PASCAL-5i tree (tests/test_real_builders.py).
"""

import json
from pathlib import Path
import socket
import subprocess
import sys

import numpy as np
import pytest

from lseg_jax import checkpoint
from helpers import DEMO, cpu_env, demo, eval_cli, load_module, random_variables
from helpers import pascal_fold  # noqa: F401  (a session fixture)

ROOT = Path(__file__).resolve().parents[1]
FEWSHOT = f"{ROOT / 'configs' / 'fewshot_lsegzs.py'}:dataset=pascal5i,fold=0"
fewshot_config = load_module(ROOT / "configs" / "fewshot_lsegzs.py", "lseg_config_fewshot_lsegzs")
SPLITS = {"single": "validation", "multiscale": "validation[:6]", "fewshot": "test[:40]"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
  config = demo.get_config("backbone=tiny").model
  return checkpoint.save_model(tmp_path_factory.mktemp("model") / "tiny", random_variables(config, 7), config)


@pytest.fixture(scope="module")
def pascal_input(pascal_fold) -> dict:
  """The shared fake PASCAL-5i fold 0 (helpers.pascal_fold, 1000 test episodes)."""
  return dict(data_dir=pascal_fold["input"]["data_dir"], manual_dir=pascal_fold["input"]["manual_dir"], crop_size=64,
              num_threads=1, worker_count=0)


def overrides(protocol: str, shapes_config: dict, pascal_input: dict) -> dict:
  """Config fields of each protocol's run (base_size 80: scales 0.5-1.75 put
  the long side below and above the 64 crop)."""
  if protocol == "fewshot":
    return {"input": pascal_input, "evals": {"batch_size": 8}}
  return {"input": {**shapes_config, "base_size": 80}, "evals": {"batch_size": 8}}


def make_config(protocol: str, shapes_config: dict, pascal_input: dict, devices: int):
  """The run config of `protocol` on a `devices`-device mesh."""
  config = fewshot_config.get_config("dataset=pascal5i,fold=0") if protocol == "fewshot" else demo.get_config(
      "backbone=tiny")
  for section, fields in overrides(protocol, shapes_config, pascal_input).items():
    config[section].update(fields)
  config.mesh = (("data", devices),)
  return config


def scores_in_process(protocol: str, model_dir: Path, config) -> dict:
  model, variables, table, _ = eval_cli.load_network(model_dir, config, eval_cli.data.label_names(config.input))
  return eval_cli.PROTOCOLS[protocol](config, model, variables, table, SPLITS[protocol])


@pytest.fixture(scope="module")
def one_device(model_dir, shapes_config, pascal_input) -> dict:
  return {p: scores_in_process(p, model_dir, make_config(p, shapes_config, pascal_input, 1)) for p in SPLITS}


def assert_same_scores(got: dict, expected: dict) -> None:
  for key in ("mIoU", "pixAcc", "FB-IoU", "loss"):
    if key in expected:
      assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
  got_iou = got["IoU"] if isinstance(got["IoU"], list) else list(got["IoU"].values())
  expected_iou = expected["IoU"] if isinstance(expected["IoU"], list) else list(expected["IoU"].values())
  np.testing.assert_allclose(got_iou, expected_iou, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("protocol", list(SPLITS))
def test_eight_devices_give_the_scores_of_one(protocol, model_dir, shapes_config, pascal_input, one_device):
  scores = scores_in_process(protocol, model_dir, make_config(protocol, shapes_config, pascal_input, 8))
  assert_same_scores(scores, one_device[protocol])
  assert 0.0 < one_device[protocol]["mIoU"]  # predictions vary: the comparison means something


def run_two_processes(args: list[str]) -> list[subprocess.CompletedProcess]:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = cpu_env(4)
  procs = [subprocess.Popen([sys.executable, str(ROOT / "eval.py"), *args, f"--coordinator_address=localhost:{port}",
                             "--num_processes=2", f"--process_id={i}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  return [(p, p.communicate(timeout=600)[0]) for p in procs]


@pytest.mark.parametrize("protocol", list(SPLITS))
def test_two_processes_give_the_scores_of_one(protocol, model_dir, shapes_config, pascal_input, one_device,
                                              tmp_path):
  config = DEMO if protocol != "fewshot" else FEWSHOT
  flat = [f"--config.{section}.{k}={v}" for section, fields in overrides(protocol, shapes_config, pascal_input).items()
          for k, v in fields.items()]
  out = tmp_path / "scores.json"
  results = run_two_processes(["--checkpoint", str(model_dir), "--config", config, *flat, "--protocol", protocol,
                               "--split", SPLITS[protocol], "--out", str(out)])
  for proc, log in results:
    assert proc.returncode == 0, log[-3000:]
  assert_same_scores(json.loads(out.read_text()), one_device[protocol])
