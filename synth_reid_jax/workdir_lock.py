"""One run writes a workdir at a time: `<workdir>/.lock`, held with flock by the process that writes it.

The operating system drops the lock when its process ends however it ends (SIGKILL, a lost machine), so a
lock left by a dead run is simply taken over. The file's content (pid, host, start time) names the holder in
the message a second run gets; a clean exit empties it, so content found with the lock free means a run that
died, and the new run says it took that lock over. Taking the lock is also the check that the workdir can be
written (storage.check_folder): a file in its place, a read-only or full disk stop the run there, in one
line, before any data is read.
"""

import fcntl
import json
import os
import socket
import time

from synth_reid_jax import storage
from synth_reid_jax.errors import WorkdirBusyError

LOCK_FILE = ".lock"


def _describe(holder):
  if not holder:
    return "another process"
  started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
  return f"process {holder.get('pid')} on {holder.get('host')} (mode {holder.get('mode')}, started {started})"


def _read(fd):
  os.lseek(fd, 0, os.SEEK_SET)
  text = os.read(fd, 4096).decode(errors="replace").strip()
  try:
    return json.loads(text) if text else None
  except ValueError:
    return None


class WorkdirLock:
  """`with WorkdirLock(workdir, mode):` holds the workdir's lock, or raises WorkdirBusyError at once.

  `took_over` is the description of a dead run whose lock was taken over (None when the lock was free).
  """

  def __init__(self, workdir, mode="train"):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.mode = mode
    self.took_over = None
    self._fd = None

  def acquire(self):
    workdir = os.path.dirname(self.path)
    storage.check_folder(workdir, "--workdir")
    with storage.storage_errors(workdir, "Give a --workdir this process can write into."):
      os.makedirs(workdir, exist_ok=True)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read(fd)
      os.close(fd)
      raise WorkdirBusyError(
          f"The workdir {os.path.dirname(self.path)} is in use by {_describe(holder)}. Wait for that run to "
          "finish (or stop it), or use another --workdir.") from None
    previous = _read(fd)
    if previous is not None:
      self.took_over = _describe(previous)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "mode": self.mode, "started": time.time()}
    try:
      with storage.storage_errors(workdir, "Give a --workdir on a disk with free space."):
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
    except BaseException:
      os.close(fd)
      raise
    self._fd = fd
    return self

  def release(self):
    """Empties the file (a clean exit) and unlocks. The file stays: removing it could let two processes lock
    two different files under the same name."""
    if self._fd is None:
      return
    os.ftruncate(self._fd, 0)
    os.close(self._fd)
    self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
