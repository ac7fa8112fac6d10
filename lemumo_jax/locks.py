"""One writer per folder: an exclusive lock per stage folder (a workdir's stage, a dataset
build), taken before anything is read or written and released when the process ends.

The lock is a POSIX record lock (fcntl.lockf) on `<folder>/.lock-<name>`, which the kernel
drops when its process dies, however it dies: there are no stale locks to clean up, and on a
shared filesystem that supports them (NFS v4, Lustre, GCS FUSE does not) it excludes writers
on other hosts too. The holder writes its host, PID, start time and command into the file, so
a refused process can say who holds the folder. A process may take a lock it holds again (the inner
block is a no-op). POSIX locks belong to the process, and closing any descriptor of the file
drops them: the holder never opens the file a second time.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import struct
import sys
import time
from collections.abc import Iterator


_HELD: set[str] = set()  # the lock files this process holds


class FolderBusyError(RuntimeError):
  """Another process holds the lock; the message names the folder and the holder."""


def _path(folder: str, name: str) -> str:
  return os.path.join(folder, f'.lock-{name}')


def holder(folder: str, name: str) -> dict | None:
  """Who holds `folder`'s `name` lock when another process does, else None (a lock file left by
  a process that ended is free). Asks the kernel (F_GETLK), taking nothing: a lock this process
  holds stays held, and a process starting meanwhile is never refused because of the check."""
  path = _path(folder, name)
  if os.path.realpath(path) in _HELD or not os.path.exists(path):
    return None
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return None
  try:
    pid = _conflicting_pid(fd)
  finally:
    os.close(fd)
  if pid is None:
    return None
  info = _read(path) or {}
  if info.get('pid') != pid and pid > 0:  # the holder has not written the file yet
    info = {'host': socket.gethostname(), 'pid': pid}
  return info or {'host': '?', 'pid': '?'}


# struct flock: l_type, l_whence (short), l_start, l_len (off_t), l_pid (pid_t), padded as the
# kernel lays it out on 64-bit Linux.
_FLOCK = 'hhqqi4x'


def _conflicting_pid(fd: int) -> int | None:
  """The PID of a process whose lock on `fd`'s file would block an exclusive lock, or None.
  0 when the holder is on another host (NFS reports no PID)."""
  query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
  try:
    answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
  except OSError:  # F_GETLK on a read-only descriptor is refused on some filesystems
    return None
  l_type, _, _, _, pid = struct.unpack(_FLOCK, answer)
  return None if l_type == fcntl.F_UNLCK else pid


def _read_fd(fd: int) -> dict | None:
  """The holder info in the lock file open as `fd`. The holder reads through its own
  descriptor: closing any other descriptor of the file would drop its POSIX lock."""
  try:
    return json.loads(os.pread(fd, 1 << 16, 0).decode() or 'null')
  except (OSError, ValueError):
    return None


def _read(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.loads(f.read() or 'null')
  except (OSError, ValueError):
    return None


def describe(info: dict) -> str:
  started = info.get('started')
  when = time.strftime(' since %Y-%m-%d %H:%M:%S', time.localtime(started)) if started else ''
  command = f' ({info["command"]})' if info.get('command') else ''
  return f'process {info.get("pid")} on host {info.get("host")}{when}{command}'


@contextlib.contextmanager
def folder_lock(folder: str, name: str, what: str) -> Iterator[None]:
  """Holds `folder`'s exclusive `name` lock for the block (creating the folder). Raises
  FolderBusyError, naming the folder and the holder, when another process holds it; a folder
  path that is a file is a NotADirectoryError naming it."""
  if os.path.exists(folder) and not os.path.isdir(folder):
    raise NotADirectoryError(f'{folder} is a file, not a folder: give another path for {what}')
  os.makedirs(folder, exist_ok=True)
  path = os.path.realpath(_path(folder, name))
  if path in _HELD:  # this process holds it already: closing a second descriptor of the
    yield            # file would release the first's POSIX lock, so none is opened
    return
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      info = holder(folder, name) or _read(path) or {'host': '?', 'pid': '?'}
      raise FolderBusyError(
          f'{folder} is in use: {describe(info)} is running {info.get("what", what)} in it. '
          'One writer per folder: wait for it to finish (or stop it), or use another '
          'folder') from e
    previous = _read_fd(fd)  # non-empty: its holder ended without releasing it (killed)
    if previous and previous.get('pid') != os.getpid():
      print(f'{folder}: taking over the {name} lock of {describe(previous)}, which ended '
            'without releasing it', flush=True)
    _write(fd, {'host': socket.gethostname(), 'pid': os.getpid(), 'started': time.time(),
                'what': what, 'command': ' '.join(sys.argv)[:500]})
    _HELD.add(path)
    try:
      yield
    finally:
      _HELD.discard(path)
      os.ftruncate(fd, 0)  # released cleanly: the next holder has nothing to report
  finally:
    os.close(fd)  # releases the lock; the (empty) file stays


def _write(fd: int, info: dict) -> None:
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps(info).encode(), 0)
  os.fsync(fd)


def busy_stages(workdir: str) -> dict[str, dict]:
  """{stage: holder} of the locks (lemumo_jax.main's stages) other processes hold in `workdir`
  now."""
  if not os.path.isdir(workdir):
    return {}
  names = sorted(n[len('.lock-'):] for n in os.listdir(workdir) if n.startswith('.lock-'))
  return {name: info for name in names if (info := holder(workdir, name)) is not None}
