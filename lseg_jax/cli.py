"""What every command line (train.py, eval.py, predict, embed, query,
serve, export, convert) does before its work."""

import argparse
import logging
import os


def _not_from_orbax(record: logging.LogRecord) -> bool:
  return "/orbax/" not in record.pathname


def quiet_libraries() -> None:
  """Only errors from orbax/absl/TFDS/transformers: their INFO lines (hundreds
  per run) and warnings about absent optional packages (OpenCV, PyTorch) bury
  the progress lines."""
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  logging.getLogger("absl").setLevel(logging.ERROR)
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # orbax's failed futures: train.py reports them
  # orbax logs a failed background save's traceback; train.py reports it in one line.
  logging.getLogger("absl").addFilter(_not_from_orbax)  # once, however often called
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.ERROR)


class ArgumentParser(argparse.ArgumentParser):
  """The command lines' parser: a usage mistake (an unknown flag or choice, a
  missing argument) raises ValueError, which `main` reports as every other
  mistake, in one `error:` line with exit 2 (not argparse's usage block and
  SystemExit); --help shows the module's docstring as written."""

  def __init__(self, prog: str, description: str | None):
    super().__init__(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)

  def error(self, message: str):
    raise ValueError(f"{message} (see {self.prog} --help)")
