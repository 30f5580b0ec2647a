"""Paths that are local or in a bucket (``gs://``), read and written through etils `epath`.

`epath.Path` serves ``gs://`` with TensorFlow's GCS filesystem (`tf.io.gfile`) when
TensorFlow is installed, or with fsspec/gcsfs when ``EPATH_USE_TF=false``; Orbax and
tensorstore write checkpoints to the bucket themselves. Local paths behave exactly as
before (`builtins.open`, `os.path`), only wrapped in `epath.Path`.

A bucket object is replaced whole by one upload, so writes there are atomic without the
temporary-file-and-rename a local file needs (`write_atomic`).
"""

from __future__ import annotations

import builtins
import contextlib
import io
import os
import re
import stat
import tempfile
import threading
import uuid
from collections import defaultdict
from typing import Iterator, Sequence

from etils import epath
from etils.epath import backend as epath_backend

REMOTE_PREFIX = "gs://"
# A byte range of a tar file (a member's data) or of a TFDS TFRecord shard (an image's
# bytes), as a path: FILE#OFFSET+SIZE/NAME; or of one record of a TFDS ArrayRecord shard
# (compressed, so the range is of the record's bytes): FILE#RECORD:OFFSET+SIZE/NAME.
_MEMBER = re.compile(
  r"^(?P<file>.+(?:\.tar|\.tfrecord-\d+-of-\d+|\.array_record-\d+-of-\d+))"
  r"#(?:(?P<record>\d+):)?(?P<offset>\d+)\+(?P<size>\d+)/(?P<name>.+)$"
)


def is_remote(path: str | os.PathLike) -> bool:
  """True for a ``gs://`` path."""
  return os.fspath(path).startswith(REMOTE_PREFIX)


def member(file: str, name: str, offset: int, size: int, record: int | None = None) -> str:
  """The path of `size` bytes at `offset` of the tar or TFRecord file `file` (`name`'s data):
  ``FILE#OFFSET+SIZE/NAME``, or with `record`, at `offset` of that record of the ArrayRecord
  file `file`: ``FILE#RECORD:OFFSET+SIZE/NAME``; `open`, `isfile`, `file_stamp` and
  `files_exist` take it."""
  at = "" if record is None else f"{record}:"
  return f"{file}#{at}{offset}+{size}/{name}"


def split_member(p: str | os.PathLike) -> tuple[str, int, int, int | None] | None:
  """(file, offset, size, ArrayRecord record or None) of a `member` path, else None."""
  m = _MEMBER.match(os.fspath(p))
  if not m:
    return None
  record = None if m["record"] is None else int(m["record"])
  return m["file"], int(m["offset"]), int(m["size"]), record


def _read_object(file: str, offset: int = 0, size: int | None = None) -> bytes:
  """A ``gs://`` object's bytes [offset, offset + size) (size None: to its end).

  Where epath serves ``gs://`` with fsspec (gcsfs) this is one GET of the bytes; epath's
  `open` would first ask for the object's metadata and list its folder (three requests
  per image instead of one). TensorFlow's client (epath's default when TensorFlow is
  installed) reads through epath. A missing object raises FileNotFoundError either way.
  """
  gpath = epath.Path(file)
  # The client epath chose (no public getter; without the attribute: epath's own read).
  backend = getattr(gpath, "_backend", None)
  if backend is epath_backend.fsspec_backend:
    end = None if size is None else offset + size
    return backend.fs(file).cat_file(file, start=offset or None, end=end)
  with gpath.open("rb") as f:
    f.seek(offset)
    return f.read(-1 if size is None else size)


def _read_member(file: str, offset: int, size: int, record: int | None = None) -> bytes:
  """`size` bytes at `offset` of `file` (one ranged read from a bucket), or of its
  ArrayRecord `record`."""
  if record is not None:
    data = read_array_record(file, record)[offset : offset + size]
  elif is_remote(file):
    data = _read_object(file, offset, size)
  else:
    with builtins.open(file, "rb") as f:
      f.seek(offset)
      data = f.read(size)
  if len(data) != size:
    raise OSError(f"{file}: {size} bytes at {offset} asked for, {len(data)} read (truncated)")
  return data


_ARRAY_RECORD_READERS = threading.local()  # .open: {file: (stamp, reader)}, per thread
_ARRAY_RECORD_OPEN = 8  # readers each thread keeps open


def array_record_reader(file: str):
  """An open ArrayRecordReader of a local ArrayRecord file, for random access.

  The reader opens local files only (a ``gs://`` path raises ValueError here; given one, the
  reader hangs) and does not fail on a bad file by itself (on a missing one it hangs, from
  one that is not ArrayRecord it reads 0 records): here a missing file raises
  FileNotFoundError, an unreadable one OSError.
  """
  from array_record.python import array_record_module

  if is_remote(file):
    raise ValueError(f"{file}: ArrayRecord files are read from local paths only")
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{file}: no such file")
  reader = array_record_module.ArrayRecordReader(file, "readahead_buffer_size:0,max_parallelism:0")
  if not reader.ok():
    raise OSError(f"{file}: not a readable ArrayRecord file")
  return reader


def read_array_record(file: str, record: int) -> bytes:
  """Record `record` of a local ArrayRecord file (its reader kept open per thread, reopened
  when the file changes)."""
  cache = _ARRAY_RECORD_READERS.__dict__.setdefault("open", {})
  stamp = file_stamp(file)
  if file not in cache or cache[file][0] != stamp:
    if file in cache:
      cache.pop(file)[1].close()
    if len(cache) >= _ARRAY_RECORD_OPEN:
      cache.pop(next(iter(cache)))[1].close()
    cache[file] = (stamp, array_record_reader(file))
  reader = cache[file][1]
  try:
    return reader.read([record])[0]
  except RuntimeError as e:  # out of range, a damaged chunk
    raise OSError(f"{file}: cannot read record {record}: {e}") from e


def path(p: str | os.PathLike) -> epath.Path:
  """`p` as an `epath.Path`: ``gs://`` kept as given, a local path made absolute."""
  return epath.Path(p) if is_remote(p) else epath.Path(os.path.abspath(os.fspath(p)))


def is_absolute(p: str) -> bool:
  """A local absolute path or a ``gs://`` one."""
  return os.path.isabs(p) or is_remote(p)


def open(
  file: str | os.PathLike,
  mode: str = "r",
  encoding: str | None = None,  # noqa: A001
  newline: str | None = None,
):
  """`builtins.open` for a local file; a ``gs://`` object is read whole into memory (one
  GET, `_read_object`; a missing one raises FileNotFoundError).

  Only reading is supported remotely (`write_atomic` writes); `encoding` and `newline`
  apply as in `builtins.open` (e.g. ``utf-8-sig``, ``newline=""`` for csv).
  A `member` path is read (its byte range only) into memory too.
  """
  part = split_member(file)
  if not is_remote(file) and part is None:
    return builtins.open(file, mode, encoding=encoding, newline=newline)
  if mode not in ("r", "rb"):
    raise ValueError(f"{file}: mode {mode!r}; only 'r'/'rb' open a gs:// object (use write_atomic)")
  data = io.BytesIO(_read_member(*part) if part else _read_object(file))
  return (
    data if mode == "rb" else io.TextIOWrapper(data, encoding=encoding or "utf-8", newline=newline)
  )


def isfile(p: str | os.PathLike) -> bool:
  """Whether `p` (or a `member` path's file) is a file."""
  part = split_member(p)
  if part:
    return isfile(part[0])
  return epath.Path(p).is_file() if is_remote(p) else os.path.isfile(p)


def isdir(p: str | os.PathLike) -> bool:
  return epath.Path(p).is_dir() if is_remote(p) else os.path.isdir(p)


def file_stamp(p: str) -> str | None:
  """ "<size> <mtime>" of a file (one `stat`; one request for a ``gs://`` object), or None
  if it is not a file; a `member` path: its tar file's, with its range."""
  part = split_member(p)
  if part:
    stamp = file_stamp(part[0])
    at = "" if part[3] is None else f"{part[3]}:"
    return stamp and f"{stamp} @{at}{part[1]}+{part[2]}"
  if is_remote(p):
    try:
      st = epath.Path(p).stat()
    except Exception:  # noqa: BLE001 - each gs:// backend raises its own not-found error
      return None
    return f"{st.length} {st.mtime}"
  try:
    st = os.stat(p)
  except (OSError, ValueError):  # ValueError: a NUL byte in the path
    return None
  return f"{st.st_size} {st.st_mtime_ns}" if stat.S_ISREG(st.st_mode) else None


def files_exist(paths: Sequence[str]) -> list[bool]:
  """Whether each path is a file. A ``gs://`` folder is listed once (one request per
  1000 objects) instead of one request per image; a `member` path: its tar file."""
  paths = [(split_member(p) or (p,))[0] for p in paths]
  listed: dict[str, set[str]] = {}
  by_folder = defaultdict(list)
  for p in paths:
    if is_remote(p):
      by_folder[os.path.dirname(p)].append(p)
  for folder in by_folder:
    d = epath.Path(folder)
    listed[folder] = {os.path.basename(os.fspath(c)) for c in d.iterdir()} if d.is_dir() else set()
  return [
    os.path.basename(p) in listed[os.path.dirname(p)] if is_remote(p) else os.path.isfile(p)
    for p in paths
  ]


def write_atomic(file: str | os.PathLike, data: bytes) -> None:
  """Writes `data` so readers see the old file or the new one, never part of one: a
  local temporary file renamed over `file`, or one object upload to a bucket."""
  if is_remote(file):
    epath.Path(file).write_bytes(data)
    return
  tmp = f"{os.fspath(file)}.{uuid.uuid4().hex}.tmp"
  with builtins.open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, file)


def create_new(file: str | os.PathLike, data: bytes) -> bool:
  """Writes `data` to `file` only if no such file exists -> whether it did; never a partial
  file. Locally a complete temporary file is hard-linked to the name (linking fails on an
  existing name); a bucket object is uploaded with the precondition "no object yet"
  (``ifGenerationMatch=0``, through gcsfs), so of two concurrent writers exactly one wins."""
  if is_remote(file):
    import fsspec

    try:
      fsspec.filesystem("gs").pipe_file(os.fspath(file), data, mode="create")
    except FileExistsError:  # HTTP 412: the precondition failed
      return False
    return True
  tmp = f"{os.fspath(file)}.{uuid.uuid4().hex}.tmp"
  with builtins.open(tmp, "wb") as f:
    f.write(data)
  try:
    os.link(tmp, file)
  except FileExistsError:
    return False
  finally:
    os.unlink(tmp)
  return True


class AppendLog:
  """A text file grown by `write` (each write is flushed): appended to locally; a bucket
  has no append, so there the object is rewritten whole, earlier content kept."""

  def __init__(self, file: str | os.PathLike):
    self.file = file
    self._local = None if is_remote(file) else builtins.open(file, "a", encoding="utf-8")
    if self._local is None:
      self._text = epath.Path(file).read_text() if epath.Path(file).exists() else ""

  def write(self, text: str) -> None:
    if self._local is not None:
      self._local.write(text)
      self._local.flush()
      return
    self._text += text
    write_atomic(self.file, self._text.encode())

  def close(self) -> None:
    if self._local is not None:
      self._local.close()


def move_tree(source: epath.Path, target: epath.Path) -> None:
  """Moves folder `source` to `target` (which must not exist): a rename locally; a bucket
  has neither folders nor rename, so there each object is copied, then `source` deleted."""
  if not is_remote(source):
    target.parent.mkdir(parents=True, exist_ok=True)
    source.rename(target)
    return
  for file in _files_under(source):
    file.copy(target / file.relative_to(source))
  source.rmtree()


PARTIAL_MARKER = "WRITE_IN_PROGRESS"


@contextlib.contextmanager
def publish_dir(target: str | os.PathLike) -> Iterator[epath.Path]:
  """A folder to fill, which readers see at `target` whole or not at all.

  Locally: a hidden sibling ``.<name>.partial-<id>`` (holding `PARTIAL_MARKER`), renamed
  to `target` on success (a previous `target` is renamed away first, then deleted; it may
  hold only names the new folder holds, else FileExistsError) and deleted on failure; leftovers of killed writers are deleted on the next call. A bucket
  has no rename: `target` itself is filled, with `PARTIAL_MARKER` written first and
  deleted last, so a reader that checks `is_partial` refuses a half-written folder.
  """
  target = path(target)
  if is_remote(target):
    target.mkdir(parents=True, exist_ok=True)
    (target / PARTIAL_MARKER).write_text("being written; incomplete until this file is gone\n")
    yield target
    (target / PARTIAL_MARKER).unlink()
    return
  parent = target.parent
  parent.mkdir(parents=True, exist_ok=True)
  for leftover in parent.glob(f".{target.name}.partial-*"):
    leftover.rmtree()
  for leftover in parent.glob(f".{target.name}.old-*"):
    leftover.rmtree()
  tmp = parent / f".{target.name}.partial-{uuid.uuid4().hex}"
  tmp.mkdir()
  (tmp / PARTIAL_MARKER).write_text("being written; incomplete\n")
  try:
    yield tmp
  except BaseException:
    if tmp.exists():
      tmp.rmtree()
    raise
  (tmp / PARTIAL_MARKER).unlink()
  old = parent / f".{target.name}.old-{uuid.uuid4().hex}"
  if target.exists():
    foreign = sorted({c.name for c in target.iterdir()} - {c.name for c in tmp.iterdir()})
    if foreign:  # replacing it would delete them
      tmp.rmtree()
      raise FileExistsError(
        f"{target} holds {foreign[0]!r}{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}, "
        "which this write would not replace; choose a new or empty directory"
      )
    target.rename(old)
  tmp.rename(target)
  if old.exists():
    old.rmtree()


def is_partial(folder: str | os.PathLike) -> bool:
  """Whether `folder` (or the folder holding it) is being written by `publish_dir`."""
  folder = path(folder)
  return (folder / PARTIAL_MARKER).exists() or (folder.parent / PARTIAL_MARKER).exists()


def _files_under(folder: epath.Path):
  for child in folder.iterdir():
    if child.is_dir():
      yield from _files_under(child)
    else:
      yield child


class LocalMirror:
  """A local folder for writers that need one (TensorBoard's), mirrored to `target`.

  A local `target` is the folder itself. For a ``gs://`` target, writers use a temporary
  folder and `sync` uploads each of its files that grew, whole (a bucket has no append).
  """

  def __init__(self, target: epath.Path):
    self.target = target
    self._tmp = tempfile.TemporaryDirectory(prefix="negclip_jax_") if is_remote(target) else None
    self.local = self._tmp.name if self._tmp else os.fspath(target)
    self._synced: dict[str, int] = {}

  def sync(self) -> None:
    if self._tmp is None:
      return
    for name in sorted(os.listdir(self.local)):
      file = os.path.join(self.local, name)
      if os.path.isfile(file) and os.path.getsize(file) != self._synced.get(name):
        with builtins.open(file, "rb") as f:
          data = f.read()
        write_atomic(self.target / name, data)
        self._synced[name] = len(data)

  def close(self) -> None:
    self.sync()
    if self._tmp is not None:
      self._tmp.cleanup()
