"""Files written whole or not at all.

Every file a run or a front end leaves (run configs, scores, export
artifacts, features, manifests, pictures) is written by `write_atomic`:
a reader, or a rerun that skips finished outputs, sees the old file or the
new one, never a half-written one, whatever stopped the writer (kill -9, a
full disk, a lost mount).
"""

from collections.abc import Callable
import errno
import os
from pathlib import Path
from typing import BinaryIO
import uuid

FULL_BELOW = 1 << 20  # bytes free under which a short write is taken for a full disk


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
  """Calls `write` on a new sibling temporary file, syncs it to the disk and
  renames it onto `path`; the temporary file is removed if anything fails.
  The file's mode is the usual 0666 less the umask (mkstemp's would be 0600)."""
  tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
  try:
    with open(tmp, "xb") as f:  # O_EXCL, mode 0666 & ~umask
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:
    # numpy's writes report a short write without its cause ("N requested
    # and M written"): a full disk is what leaves no room.
    full = isinstance(e, OSError) and e.errno is None and _free_bytes(path.parent) < FULL_BELOW
    tmp.unlink(missing_ok=True)
    if full:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
    raise


def _free_bytes(directory: Path) -> int:
  stat = os.statvfs(directory)
  return stat.f_bavail * stat.f_frsize


def write_text_atomic(path: Path, text: str) -> None:
  """`write_atomic` of a UTF-8 text."""
  write_atomic(path, lambda f: f.write(text.encode()))
