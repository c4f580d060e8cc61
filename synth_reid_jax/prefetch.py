"""Training batches prepared ahead of the step that reads them: read, decoded and placed on the devices by a
background thread while the devices run the current step.
"""

import queue
import threading
from collections.abc import Callable
from typing import Any

# Seconds between checks of the stop flag while the queue is full or empty.
_POLL_SECONDS = 0.1
# close() waits this long for the batch being produced; the daemon thread then ends with the process.
_JOIN_SECONDS = 60.0


class _Failure:
  """An exception raised in the producer thread, re-raised by the consumer."""

  def __init__(self, error: BaseException):
    self.error = error


class Prefetcher:
  """Iterates `produce()` results computed `depth` ahead in a daemon thread, each with the `snapshot()` taken
  right after it was produced.

  The snapshot is what the consumer needs when it acts on that item later - for the trainer, the data
  iterators' states after the batch, which a checkpoint taken after the step reading it must save (by then
  the iterators themselves have run ahead by up to `depth` batches). An exception in `produce` is raised by
  the `next()` that would have returned its item. Use as a context manager or call `close()`.
  """

  def __init__(self, produce: Callable[[], Any], snapshot: Callable[[], Any], depth: int = 2):
    if depth < 1:
      raise ValueError(f"Prefetch depth must be >= 1, got {depth}.")
    self._produce, self._snapshot = produce, snapshot
    self._queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="batch-prefetch", daemon=True)
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=_POLL_SECONDS)
        return True
      except queue.Full:
        continue
    return False

  def _run(self):
    try:
      while not self._stop.is_set():
        item = self._produce()
        if not self._put((item, self._snapshot())):
          return
    except BaseException as error:  # noqa: BLE001 - handed to the consumer thread, which raises it
      self._put(_Failure(error))

  def __iter__(self):
    return self

  def __next__(self):
    while True:
      try:
        item = self._queue.get(timeout=_POLL_SECONDS)
        break
      except queue.Empty:
        if not self._thread.is_alive() and self._queue.empty():
          raise RuntimeError("The batch prefetching thread stopped without a batch or an error.") from None
    if isinstance(item, _Failure):
      self.close()
      raise item.error
    return item

  def close(self):
    """Stops the thread (after the item it is producing, if any) and drops what it had prepared."""
    self._stop.set()
    while True:
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    if self._thread is not threading.current_thread():
      self._thread.join(_JOIN_SECONDS)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
