"""Where runs write: a folder checked before any work, and storage errors met while writing as one line.

The check writes (and removes) a one-byte file, so it sees what the operating system will say later - a
read-only mount, missing permissions, a full disk - whoever runs it (root ignores permission bits, and
`os.access` cannot tell a full disk).
"""

import contextlib
import errno
import os
import tempfile

from synth_reid_jax.errors import StorageError

# OS errors that only writing raises: the storage is full or read-only, wherever the file is.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
# OS errors of a folder that cannot be written (permissions, a file where a folder should be); reading can
# raise them too, so they count only for files inside the folder written.
FOLDER_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST, errno.EISDIR})
_PROBE_PREFIX = ".write_check_"


def inside(path: str, folder: str) -> bool:
  """Whether `path` is `folder` or lies under it (links resolved)."""
  path, folder = os.path.realpath(path), os.path.realpath(folder)
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def folder_problem(path: str) -> str | None:
  """Why files cannot be written into folder `path` (made if missing), or None when they can."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.exists(path) and not os.path.isdir(path):
    return "is a file, not a folder"
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    return f"cannot be made: {existing} is a file"
  try:
    fd, probe = tempfile.mkstemp(prefix=_PROBE_PREFIX, dir=existing)
    try:
      os.write(fd, b"\0")
      os.fsync(fd)
    finally:
      os.close(fd)
      os.remove(probe)
  except OSError as e:
    return f"cannot be written ({existing}: {e.strerror or e})"
  return None


def check_folder(path: str, flag: str) -> None:
  """Raises StorageError (before any work) unless files can be written into folder `path`."""
  problem = folder_problem(path)
  if problem is not None:
    raise StorageError(f"{flag} {path} {problem}. Give a folder this process can write into, on a disk with "
                       "free space.")


def is_storage_error(error: BaseException, folder: str) -> bool:
  """Whether `error` says the storage of `folder` cannot take the writes."""
  if not isinstance(error, OSError) or isinstance(error, StorageError):
    return False
  if error.errno in WRITE_ERRNOS:
    return True
  if error.errno not in FOLDER_ERRNOS:
    return False
  if not error.filename:
    return True
  folder = os.path.abspath(folder)
  path = os.path.abspath(os.fsdecode(error.filename))
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def storage_error(error: OSError, folder: str, then: str) -> StorageError:
  """The one-line StorageError of `error` met while writing into `folder`; `then` says what was kept and
  how to go on."""
  target = os.fsdecode(error.filename) if error.filename else f"into {folder}"
  return StorageError(f"Cannot write {target}: {error.strerror or error}. {then}")


@contextlib.contextmanager
def storage_errors(folder: str, then: str):
  """Turns a storage OSError met while writing into `folder` (full disk, read-only mount, permissions, a file
  where a folder should be) into one StorageError; any other error passes unchanged."""
  try:
    yield
  except OSError as e:
    if not is_storage_error(e, folder):
      raise
    raise storage_error(e, folder, then) from e


@contextlib.contextmanager
def replaced(path: str):
  """Yields a temporary path beside `path`; what the block writes there replaces `path` when it ends without
  error (one rename). A reader, a crash or a full disk sees the old file or the new one, never half of one;
  on an error the temporary file is removed and the old file is kept."""
  temporary = f"{path}.tmp{os.getpid()}"
  try:
    yield temporary
    os.replace(temporary, path)
  finally:
    if os.path.lexists(temporary):
      os.remove(temporary)


def write_file(path: str, data: str | bytes) -> None:
  """Writes `data` to `path` through `replaced`."""
  with replaced(path) as temporary:
    with open(temporary, "wb" if isinstance(data, bytes) else "w") as f:
      f.write(data)
