"""The offline demo's promise (slow: ~5 minutes; `python -m pytest -m slow`):
`python train.py` with no flags reaches validation mIoU >= 0.7 on lseg_shapes."""

import os
from pathlib import Path
import re
import subprocess
import sys
import time

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_default_demo_reaches_miou_0_7(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TFDS_DATA_DIR": str(tmp_path / "tfds")}
  t0 = time.time()
  proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--workdir", str(tmp_path / "demo")],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  miou = float(re.search(r"val mIoU=([0-9.]+)", proc.stdout).group(1))
  print(f"demo: val mIoU {miou:.4f} in {time.time() - t0:.0f} s")
  assert miou >= 0.7
