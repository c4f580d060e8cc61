"""Workdirs and output folders that cannot be written - a file in the way, a read-only mount, a full disk -
end in one line naming the path, before any work where that can be known, keeping what was written.

Tests run as root, which ignores permission bits: a read-only folder is a read-only bind mount and a full
disk a small tmpfs, each inside a private mount namespace (`unshare -m`) when this machine allows it; the
in-process tests simulate both by making the write raise the OS error.
"""

import errno
import os
import shlex
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import processes
import pytest
from PIL import Image

from synth_reid_jax import inference, storage, workdir_lock
from synth_reid_jax.errors import StorageError, WorkdirBusyError

MAX_ERROR_LINES = 4


def raise_on_write(monkeypatch, error_number, module=storage.os):
  """Every os.write in `module` raises OSError(error_number), as a read-only or full disk does."""
  def write(fd, data):
    raise OSError(error_number, os.strerror(error_number))
  monkeypatch.setattr(module, "write", write)


# --- The up-front check -------------------------------------------------------------------------------------


def test_folder_problem_names_what_is_in_the_way(tmp_path):
  assert storage.folder_problem(str(tmp_path / "new" / "run")) is None
  assert os.listdir(tmp_path) == []  # the check leaves nothing behind, and makes no folder
  (tmp_path / "file").write_text("x")
  assert storage.folder_problem(str(tmp_path / "file")) == "is a file, not a folder"
  under_a_file = storage.folder_problem(str(tmp_path / "file" / "x"))
  assert under_a_file == f"cannot be made: {tmp_path / 'file'} is a file"


@pytest.mark.parametrize("error_number", [errno.EROFS, errno.ENOSPC, errno.EACCES])
def test_a_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch, error_number):
  raise_on_write(monkeypatch, error_number)
  with pytest.raises(StorageError, match=rf"^--workdir {tmp_path} cannot be written \({tmp_path}: "
                                         rf"{os.strerror(error_number)}\)\. Give a folder"):
    storage.check_folder(str(tmp_path), "--workdir")
  assert os.listdir(tmp_path) == []


def test_the_workdir_lock_checks_the_workdir(tmp_path, monkeypatch):
  (tmp_path / "file").write_text("x")
  with pytest.raises(StorageError, match="--workdir .*file is a file, not a folder"):
    workdir_lock.WorkdirLock(str(tmp_path / "file")).acquire()
  with pytest.raises(StorageError, match="--workdir .*/x cannot be made: .*file is a file"):
    workdir_lock.WorkdirLock(str(tmp_path / "file" / "x")).acquire()
  raise_on_write(monkeypatch, errno.ENOSPC)
  with pytest.raises(StorageError, match="No space left on device"):
    workdir_lock.WorkdirLock(str(tmp_path / "run")).acquire()
  monkeypatch.undo()
  with workdir_lock.WorkdirLock(str(tmp_path / "run")):  # the lock itself still works
    with pytest.raises(WorkdirBusyError):
      workdir_lock.WorkdirLock(str(tmp_path / "run")).acquire()


def test_storage_errors_turns_write_errors_into_one_line_and_lets_others_pass(tmp_path):
  then = "Rerun the same command."
  with pytest.raises(StorageError, match=rf"^Cannot write into {tmp_path}: No space left on device\. {then}"):
    with storage.storage_errors(str(tmp_path), then):
      raise OSError(errno.ENOSPC, "No space left on device")
  inside = str(tmp_path / "metrics.jsonl")
  with pytest.raises(StorageError, match=rf"^Cannot write {inside}: Permission denied"):
    with storage.storage_errors(str(tmp_path), then):
      raise PermissionError(errno.EACCES, "Permission denied", inside)
  with pytest.raises(PermissionError):  # reading another folder's file: not this folder's storage
    with storage.storage_errors(str(tmp_path), then):
      raise PermissionError(errno.EACCES, "Permission denied", "/elsewhere/weights.npz")
  with pytest.raises(FileNotFoundError):
    with storage.storage_errors(str(tmp_path), then):
      raise FileNotFoundError(errno.ENOENT, "No such file or directory", inside)


# --- translate / extract outputs ----------------------------------------------------------------------------


def test_translate_checks_its_output_folder_is_writable(tmp_path, monkeypatch):
  images = tmp_path / "images"
  images.mkdir()
  (tmp_path / "file").write_text("x")
  with pytest.raises(StorageError, match="--output_dir .*/x cannot be made: .*file is a file"):
    inference.check_translate_output(str(images), str(tmp_path / "file" / "x"), ["a.jpg"])
  raise_on_write(monkeypatch, errno.EROFS)
  with pytest.raises(StorageError, match=r"--output_dir .*out cannot be written \(.*Read-only file system\)"):
    inference.check_translate_output(str(images), str(tmp_path / "out"), ["a.jpg"])
  with pytest.raises(StorageError, match=r"--output .*f\.npz: the folder .*out cannot be written"):
    inference.extract_output_path(str(tmp_path / "out" / "f.npz"), str(images))


def failing_save(monkeypatch, error_number):
  """PIL's save and numpy's savez write half of their bytes, then the disk is full."""
  def save(self, fp, format=None, **params):
    with open(fp, "wb") as f:
      f.write(b"\x89PNG half")
    raise OSError(error_number, os.strerror(error_number))
  monkeypatch.setattr(Image.Image, "save", save)

  def savez(file, **arrays):
    file.write(b"PK half")
    raise OSError(error_number, os.strerror(error_number))
  monkeypatch.setattr(np, "savez", savez)


def test_a_failed_output_write_leaves_no_partial_file_and_keeps_the_older_one(tmp_path, monkeypatch):
  older = tmp_path / "out" / "sub" / "a.png"
  older.parent.mkdir(parents=True)
  older.write_bytes(b"older image")
  failing_save(monkeypatch, errno.ENOSPC)
  with pytest.raises(OSError, match="No space left"):
    inference._write_image(np.zeros((4, 2, 3), np.uint8), str(older))
  with pytest.raises(OSError, match="No space left"):
    inference._write_image(np.zeros((4, 2, 3), np.uint8), str(tmp_path / "out" / "new.jpg"))
  npz = tmp_path / "out" / "features.npz"
  npz.write_bytes(b"older features")
  with pytest.raises(OSError, match="No space left"):
    inference._write_npz(str(npz), {"features": np.zeros((2, 3))})
  assert older.read_bytes() == b"older image" and npz.read_bytes() == b"older features"
  assert sorted(os.listdir(tmp_path / "out")) == ["features.npz", "sub"]
  assert os.listdir(older.parent) == ["a.png"]


# --- launch.py ----------------------------------------------------------------------------------------------


# What Python prints at exit for the coroutines of an Orbax save the full disk cut short.
EXIT_WARNINGS = ("sys:1: RuntimeWarning: coroutine", "RuntimeWarning: Enable tracemalloc")


def assert_one_fatal_line(code, out, *fragments):
  assert code == 1, out
  assert "Traceback" not in out, out
  lines = [line for line in out.splitlines() if line.strip() and not line.startswith(("I0000", "W0000"))
           and not line.startswith(EXIT_WARNINGS)]
  bars = [i for i, line in enumerate(lines) if "%|" in line]
  after = lines[bars[-1] + 1:] if bars else lines
  assert len(after) <= MAX_ERROR_LINES, out
  assert after[-1].startswith("FATAL ") and all(f in after[-1] for f in fragments), out


@pytest.mark.parametrize("where", ["file", "under_a_file"])
def test_launch_refuses_a_workdir_that_is_a_file_in_one_line(launcher, tmp_path, where):
  (tmp_path / "file").write_text("x")
  workdir = str(tmp_path / "file") if where == "file" else str(tmp_path / "file" / "run")
  code, out = processes.finish(launcher(workdir))
  problem = "is a file, not a folder" if where == "file" else f"cannot be made: {tmp_path / 'file'} is a file"
  assert_one_fatal_line(code, out, f"FATAL --workdir {workdir} {problem}")
  assert (tmp_path / "file").read_text() == "x"


def test_launch_translate_refuses_its_output_folder_before_loading_the_model(launcher, tmp_path):
  """The workdir has no checkpoint: the output folder's error coming first shows it is checked before."""
  images = tmp_path / "images"
  images.mkdir()
  Image.fromarray(np.zeros((16, 8, 3), np.uint8)).save(images / "0001_c1s1_000001_01.png")
  (tmp_path / "file").write_text("x")
  output = str(tmp_path / "file" / "out")
  code, out = processes.finish(launcher(str(tmp_path / "run"), "--mode=translate", f"--input_dir={images}",
                                        f"--output_dir={output}"))
  assert_one_fatal_line(code, out, f"FATAL --output_dir {output} cannot be made")


# --- Real read-only and full storage (a private mount namespace) --------------------------------------------


def _can_mount(tmp_path):
  point = tmp_path / "probe"
  point.mkdir()
  if shutil.which("unshare") is None:
    return False
  done = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {point}"],
                        capture_output=True)
  return done.returncode == 0


@pytest.fixture
def private_mounts(tmp_path):
  if not _can_mount(tmp_path):
    pytest.skip("no private mount namespace here (unshare -m and mount need privileges); the in-process "
                "tests above simulate read-only and full disks")
  return tmp_path


def launch_command(fake_manual_dir, fake_data_dir, workdir, *args):
  command = processes.script_command(
      os.path.join(processes.REPO, "launch.py"), f"--config={processes.REPO}/configs/gta2duke.py:tiny",
      f"--workdir={workdir}", f"--config.data.manual_dir={fake_manual_dir}",
      f"--config.data.data_dir={fake_data_dir}", "--config.data.eval_datasets=()", *args)
  return shlex.join(command)


def run_in_private_mounts(script, cache):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             XLA_FLAGS=f"--xla_force_host_platform_device_count=4 {processes.FAST_COMPILE_FLAG}")
  done = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=processes.REPO, env=env,
                        capture_output=True, text=True, timeout=3 * processes.TIMEOUT)
  return done.returncode, done.stdout + done.stderr


def test_launch_on_a_read_only_workdir_is_one_line(launcher, private_mounts, fake_manual_dir, fake_data_dir):
  workdir = private_mounts / "run"
  workdir.mkdir()
  command = launch_command(fake_manual_dir, fake_data_dir, workdir)
  code, out = run_in_private_mounts(f"mount --bind -o ro {workdir} {workdir} && exec {command}",
                                    private_mounts / "cache")
  assert_one_fatal_line(code, out, f"FATAL --workdir {workdir} cannot be written", "Read-only file system")
  assert os.listdir(workdir) == []


@pytest.mark.slow
def test_a_disk_that_fills_during_training_stops_it_in_one_line_and_the_rerun_resumes(
    launcher, private_mounts, fake_manual_dir, fake_data_dir):
  """A tmpfs workdir filled up after checkpoint 2: the run stops with one line, checkpoint 2 stays intact,
  and once space is freed the same command resumes from it."""
  workdir = private_mounts / "run"
  workdir.mkdir()
  command = launch_command(fake_manual_dir, fake_data_dir, workdir, "--config.train.num_steps=6",
                           "--config.train.checkpoint_every_steps=2", "--config.train.keep_checkpoints=10",
                           "--config.train.sample_every_steps=1000")
  script = textwrap.dedent(f"""\
      mount -t tmpfs -o size=64m tmpfs {workdir} || exit 90
      {command} > {private_mounts}/first.log 2>&1 &
      pid=$!
      while [ ! -d {workdir}/checkpoints/2 ] && kill -0 $pid 2>/dev/null; do sleep 0.05; done
      dd if=/dev/zero of={workdir}/filler bs=1M 2>/dev/null
      wait $pid; echo "first exit $?" >> {private_mounts}/first.log
      ls {workdir}/checkpoints > {private_mounts}/kept.txt
      rm {workdir}/filler
      exec {command}
      """)
  code, out = run_in_private_mounts(script, private_mounts / "cache")
  first = (private_mounts / "first.log").read_text()
  assert "first exit 1" in first, first
  assert_one_fatal_line(1, first.replace("first exit 1", ""), "No space left on device")
  assert "2" in (private_mounts / "kept.txt").read_text().split()
  assert code == 0, out
  assert "Resumed from" in out and "Traceback" not in out, out


def test_building_a_dataset_on_a_full_disk_is_one_line(private_mounts, fake_manual_dir):
  data_dir = private_mounts / "tfds"
  data_dir.mkdir()
  command = shlex.join([sys.executable, "-m", "synth_reid_jax.datasets", "dukemtmc_reid",
                        f"--manual_dir={fake_manual_dir}", f"--data_dir={data_dir}"])
  code, out = run_in_private_mounts(f"mount -t tmpfs -o size=150k tmpfs {data_dir} && {command}; "
                                    f"code=$?; ls -A {data_dir}/dukemtmc_reid; exit $code",
                                    private_mounts / "cache")
  assert code == 1, out
  assert "Traceback" not in out, out
  error = [line for line in out.splitlines() if line.startswith("error: ")]
  assert error == [f"error: Cannot build dukemtmc_reid into data_dir {data_dir}: No space left on device. "
                   "Free space or choose a writable folder (config.data.data_dir / --data_dir) and rerun; "
                   "nothing half-built is kept."], out
  assert out.splitlines()[-1] == error[0]  # `ls` printed nothing: no half-built folder is left
