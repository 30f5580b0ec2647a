"""Orbax checkpoints of a training run: save, restore (with fallback), preemption, read a step.

Layout under `directory/<step>/`: `state` (params, optimizer state, step; saved
once from the replicated copy), `data` (the input pipeline position and seed, JSON),
`config` (the run's config, JSON) and `checksums` (JSON: a digest of every `state` leaf and
of `data`, `digests`). Every process calls `save`; Orbax writes atomically (temporary
directory, then rename), so a half-written step is never "latest".

A step that cannot be read, or whose restored values differ from its checksums (bytes
changed on disk), is moved aside to `unreadable_dir/<step>.<UTC time>` (kept for
inspection) and the previous one is tried, so rerunning the same command always recovers;
when no step is left the run stops (`ResumeError`) unless told to start over. `resume.py`
checks that a readable step may be continued with the current config. The run directory
(`rundir.py`) names both folders.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation
from orbax.checkpoint.checkpoint_managers import save_decision_policy as save_policy

from negclip_jax import hosts, storage
from negclip_jax.train.resume import ResumeError, ways_forward


def _leaf_shapes(tree) -> dict[str, tuple]:
  """{"a/b/c": shape} of a state tree or of its Orbax metadata tree."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {
    jax.tree_util.keystr(path, simple=True, separator="/"): tuple(
      x.shape if hasattr(x, "shape") else np.shape(x)
    )
    for path, x in flat
  }


# ------------------------------------------------------------------- checksums

CHECKSUMS_ITEM = "checksums"
CHECKSUM_VERSION = 1


class ChecksumError(ValueError):
  """A restored value differs from the digest recorded when its step was saved."""


def _mix(x):
  """murmur3's 32-bit finalizer: a bijection of uint32 that spreads every input bit."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _shard_digest(data, starts, strides) -> jax.Array:
  """uint32 [2]: two sums, mod 2^32, of mix(word ^ mix(position + seed)) over the 32-bit words
  of one shard, `position` being each word's place in the whole array (`starts`: the shard's
  first index per dimension, `strides`: the whole array's, in elements). The sums of an
  array's shards add up to the array's, however it is sharded, and a changed word always
  changes them (mix is a bijection)."""
  if data.dtype == jnp.bool_:
    data = data.astype(jnp.uint8)
  bits = jnp.dtype(data.dtype).itemsize * 8
  words = jax.lax.bitcast_convert_type(data, jnp.dtype(f"uint{min(bits, 32)}")).astype(jnp.uint32)
  position = jnp.zeros(data.shape, jnp.uint32)
  for d in range(data.ndim):
    index = jax.lax.broadcasted_iota(jnp.uint32, data.shape, d) + starts[d].astype(jnp.uint32)
    position = position + index * strides[d].astype(jnp.uint32)
  if words.ndim > data.ndim:  # 64-bit values: two words each
    last = jax.lax.broadcasted_iota(jnp.uint32, words.shape, words.ndim - 1)
    position = position[..., None] * jnp.uint32(words.shape[-1]) + last
  return jnp.stack(
    [jnp.sum(_mix(words ^ _mix(position + jnp.uint32(seed))), dtype=jnp.uint32) for seed in (1, 2)]
  )


# One device-local program per shard (no collective, so nothing can wait on Orbax's
# background threads), compiled once per shard shape and dtype.
_shard_digest_jit = jax.jit(_shard_digest)


def _leaf_digest_parts(x) -> list:
  """The `_shard_digest`s of the shards of `x` this process holds, each index once
  (replica 0); a host value counts as one shard."""
  strides = np.cumprod((1, *np.shape(x)[::-1]))[:-1][::-1].astype(np.uint32)
  if not isinstance(x, jax.Array):
    return [_shard_digest_jit(x, np.zeros(np.ndim(x), np.uint32), strides)]
  return [
    _shard_digest_jit(
      shard.data, np.array([s.start or 0 for s in shard.index], np.uint32).reshape(-1), strides
    )
    for shard in x.addressable_shards
    if shard.replica_id == 0
  ]


def _json_digest(value) -> str:
  return hashlib.blake2b(json.dumps(value, sort_keys=True).encode(), digest_size=8).hexdigest()


def digests(state, data_state: dict) -> dict:
  """{"version", "state": {leaf path: 16 hex digits}, "data": 16 hex digits} of a state tree
  (global jax.Arrays, any sharding; every process calls it: each digests the shards it
  holds on their devices, then the sums are added up) and of the data-position JSON."""
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  parts = jax.device_get([_leaf_digest_parts(x) for _, x in flat])
  local = np.array(
    [np.sum(np.array(p, np.uint64).reshape(-1, 2), axis=0) for p in parts], np.uint64
  ).reshape(-1, 2)
  if jax.process_count() > 1:  # each process summed the shards it holds
    gathered = multihost_utils.process_allgather((local % 2**32).astype(np.uint32))
    local = np.asarray(gathered).astype(np.uint64)
    local = local.reshape(jax.process_count(), -1, 2).sum(axis=0)
  words = (local % 2**32).astype(">u4")
  state_digests = {
    jax.tree_util.keystr(path, simple=True, separator="/"): words[i].tobytes().hex()
    for i, (path, _) in enumerate(flat)
  }
  return {"version": CHECKSUM_VERSION, "state": state_digests, "data": _json_digest(data_state)}


def verify(where: str, recorded: dict, state, data_state: dict | None) -> None:
  """ChecksumError naming the first leaf (or the data position) of `state` / `data_state`
  whose digest differs from `recorded` (`digests` at save); `data_state` None: not checked."""
  actual = digests(state, data_state if data_state is not None else {})
  saved = recorded.get("state", {})
  for key in sorted(saved.keys() | actual["state"].keys()):
    if saved.get(key) != actual["state"].get(key):
      raise ChecksumError(
        f"{where}: tensor {key} does not match its checksum (saved {saved.get(key)}, "
        f"restored {actual['state'].get(key)}): its bytes changed on disk"
      )
  if data_state is not None and recorded.get("data") != actual["data"]:
    raise ChecksumError(f"{where}: the data position does not match its checksum")


def _has_checksums(step_dir) -> bool:
  """Steps saved before checksums existed have none (restored unverified)."""
  return (step_dir / CHECKSUMS_ITEM).exists()


# ---------------------------------------------------------------- checkpointer


class Checkpointer:
  """`ocp.CheckpointManager` for TrainState + pipeline position + config."""

  def __init__(
    self,
    directory: str | os.PathLike,
    unreadable_dir: str | os.PathLike,
    save_interval_steps: int = 1000,
    max_to_keep: int = 3,
    async_save: bool = True,
  ):
    """Steps live in `directory`; unreadable ones are moved into `unreadable_dir`."""
    self.directory = storage.path(directory)
    self.unreadable_dir = storage.path(unreadable_dir)
    policies = [
      save_policy.FixedIntervalPolicy(save_interval_steps),
      save_policy.PreemptionCheckpointingPolicy(),
    ]
    self.manager = ocp.CheckpointManager(
      self.directory,
      item_handlers=_item_handlers(),
      options=ocp.CheckpointManagerOptions(
        save_decision_policy=save_policy.AnySavePolicy(policies),
        preservation_policy=preservation.LatestN(max_to_keep),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
      ),
    )

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def save(self, step: int, state, data_state: dict, config: dict, force: bool = False) -> bool:
    """Saves `state` (one global jax.Array per leaf, e.g. `sharding.Fsdp.to_save`) at `step`;
    async unless disabled. Nothing is gathered: each process writes the shards it holds,
    and the checksums are one on-device reduction (`digests`)."""
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_state),
      config=ocp.args.JsonSave(config),
      **{CHECKSUMS_ITEM: ocp.args.JsonSave(digests(state, data_state))},
    )
    return self.manager.save(step, args=args, force=force)

  def restore_latest(
    self,
    abstract_state,
    check_config: Callable[[dict, int], None] | None = None,
    restart: bool = False,
  ) -> tuple[Any, dict, int] | None:
    """Restores the newest readable checkpoint -> (state, data_state, step), or None when
    there is none, or when every step is unreadable and `restart` (they are moved aside).

    `abstract_state`: ShapeDtypeStructs with the target shardings (`restore_target` of
    `sharding.Pmap` / `Fsdp`); any mesh, whatever mesh the step was saved from.

    `check_config(saved_config, step)` runs on each readable step first and raises to stop
    (e.g. `ResumeError`); so does a saved state tree that differs from `abstract_state`.
    Unreadable steps (corrupt files, checksum mismatches) are moved aside once a step
    restores. When none restores: `ResumeError` naming them (nothing moved), or with
    `restart` moved aside and None.
    """
    unreadable, result = [], None
    for step in sorted(self.manager.all_steps(), reverse=True):
      saved = self._read(
        step,
        "config",
        lambda: (
          self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
        ),
      )
      shapes = (
        None
        if saved is None
        else self._read(
          step,
          "state metadata",
          lambda: _leaf_shapes(self.manager.item_metadata(step)["state"].tree),
        )
      )
      if shapes is None:
        unreadable.append(step)
        continue
      if check_config is not None:
        check_config(saved, step)
      self._check_tree(step, shapes, _leaf_shapes(abstract_state))
      checked = _has_checksums(self.directory / str(step))
      items = dict(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
      if checked:
        items[CHECKSUMS_ITEM] = ocp.args.JsonRestore()
      restored = self._read(
        step, "state", lambda: self.manager.restore(step, args=ocp.args.Composite(**items))
      )
      if restored is not None and checked:
        where = f"{self.directory}/{step}"
        recorded = restored[CHECKSUMS_ITEM]
        if not self._read(
          step, "checksum", lambda: verify(where, recorded, restored.state, restored.data) or True
        ):
          restored = None
      if restored is None:
        unreadable.append(step)
        continue
      result = restored.state, restored.data, step
      break
    if result is None and unreadable and not restart:
      raise ResumeError(
        f"every checkpoint of {self.directory.parent} is unreadable (steps "
        f"{', '.join(map(str, sorted(unreadable)))} under {self.directory}; see the warnings "
        f"above), so it cannot resume; nothing was changed. To start over from step 0, rerun "
        f"with --config.restart=true (the steps are moved to {self.unreadable_dir}, the "
        f"metrics log kept as a .bak copy)"
      )
    self._move_aside(unreadable)
    return result

  def _read(self, step: int, what: str, read: Callable[[], Any]):
    """read() -> its value, or None (with a warning) if it fails on any process."""
    try:
      value, error = read(), None
    except Exception as e:  # noqa: BLE001 - any failure means "unreadable"
      value, error = None, e
    if hosts.all_processes(error is None):
      return value
    reason = (
      f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
      if error
      else "failed on another process"
    )
    logging.warning(
      "Checkpoint %s/%d is unreadable (%s: %s); falling back to an earlier one.",
      self.directory,
      step,
      what,
      reason,
    )
    return None

  def _check_tree(self, step: int, saved: dict, expected: dict):
    if saved == expected:
      return
    differ = sorted(k for k in saved.keys() | expected.keys() if saved.get(k) != expected.get(k))
    raise ResumeError(
      f"{self.directory}/{step}: the saved training state does not match this config's "
      f"({len(differ)} entries differ, first {differ[0]}: saved shape {saved.get(differ[0])}, "
      f"expected {expected.get(differ[0])}); written by another version of negclip_jax? "
      + ways_forward(self.directory.parent)
    )

  def _move_aside(self, steps: list[int]):
    """Renames unreadable step directories into workdir/unreadable_checkpoints/."""
    if not steps:
      return
    aside = self.unreadable_dir
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    if jax.process_index() == 0:
      for step in steps:
        source, target = self.directory / str(step), aside / f"{step}.{stamp}"
        try:
          storage.move_tree(source, target)
        except OSError as e:
          raise ResumeError(
            f"cannot move unreadable checkpoint {source} aside to {target} "
            f"({e.strerror}); move it by hand and rerun"
          ) from e
        logging.warning(
          "Moved unreadable checkpoint %s to %s (kept for inspection).", source, target
        )
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("negclip_jax: unreadable checkpoints moved aside")
    self.manager.reload()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


class PreemptionWatcher:
  """Turns SIGTERM and Ctrl-C (SIGINT) into "save and stop", agreed by every process.

  One process acts at the next step. Multi-process runs agree with one all-gather at
  boundary steps only (log/save steps, where the loop syncs anyway), so the other steps
  keep dispatching asynchronously; Orbax's own preemption sync point (TPU) counts at
  every step, as it is agreed without a collective.

  A second Ctrl-C, or a Ctrl-C while `saving` is False (set-up and compiling, or the export
  after the last step), ends the process at once: one line on stderr, exit status 130.
  Signals are read by a thread from `signal.set_wakeup_fd`, so they act even while the main
  thread is inside a long XLA compilation (no KeyboardInterrupt unwinds through JAX).
  """

  ABORT_EXIT = 130  # 128 + SIGINT, the shell's status for a Ctrl-C (console.INTERRUPT_EXIT)

  def __init__(self, saving: bool = True):
    self.requested = False
    self.saving = saving
    self.abort_note = "rerun the same command to resume from the newest checkpoint"
    self._interrupts = 0
    # A Ctrl-C that the parent chose to ignore (a background job of a script) stays ignored.
    watched = [signal.SIGTERM]
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
      watched.append(signal.SIGINT)
    self._previous = {s: signal.signal(s, _ignore) for s in watched}
    self._stderr = os.dup(2)  # stays the terminal while fd 2 is redirected
    self._reader, self._writer = socket.socketpair()
    self._writer.setblocking(False)
    self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
    threading.Thread(target=self._watch, name="negclip-signals", daemon=True).start()

  def _watch(self):
    while data := _recv(self._reader):
      for signum in data:
        self._handle(signum)
    self._reader.close()

  def _handle(self, signum: int):
    if signum == signal.SIGTERM:
      logging.warning("SIGTERM received: saving a checkpoint and stopping.")
      self.requested = True
    elif signum == signal.SIGINT:
      self._interrupts += 1
      if self._interrupts > 1 or not self.saving:
        self._abort("Ctrl-C again" if self._interrupts > 1 else "Ctrl-C")
      self._say(
        "Ctrl-C: saving a checkpoint at the next step and stopping (Ctrl-C again to stop at "
        "once without saving)."
      )
      self.requested = True

  def _say(self, line: str):
    """One line on the original stderr, past Python's buffered streams (whose locks the main
    thread may hold) and past a temporary redirect of fd 2 (TensorFlow's import)."""
    os.write(self._stderr, f"\n{line}\n".encode())

  def _abort(self, what: str):
    self._say(f"error: {what}: stopped at once without saving; {self.abort_note}")
    os._exit(self.ABORT_EXIT)

  def should_stop(self, step: int, checkpointer: Checkpointer, boundary: bool) -> bool:
    if checkpointer.manager.reached_preemption(step):
      return True
    if jax.process_count() == 1:
      return self.requested
    return boundary and not hosts.all_processes(not self.requested)

  def close(self):
    signal.set_wakeup_fd(self._previous_fd)
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._writer.close()  # the reader thread sees end-of-file and ends
    os.close(self._stderr)


def _ignore(signum, frame):
  """The Python-level handler: the watcher thread acts on the signal (see PreemptionWatcher)."""


def _recv(sock: socket.socket) -> bytes:
  try:
    return sock.recv(64)
  except OSError:
    return b""


class _DropReadOnlyNotice(logging.Filter):
  def filter(self, record):
    return not str(record.msg).startswith("Given directory is read only")


def _read_only_manager(directory) -> ocp.CheckpointManager:
  """A CheckpointManager that only reads, without Orbax's notices that it is read-only."""
  drop = _DropReadOnlyNotice()
  absl_logger = logging.getLogger("absl")
  absl_logger.addFilter(drop)
  try:
    return _manager(directory)
  finally:
    absl_logger.removeFilter(drop)


def _item_handlers() -> dict:
  """The items of a step: the train state, the config and data position (JSON), and the
  state's checksums."""
  return {
    "state": ocp.StandardCheckpointHandler(),
    "config": ocp.JsonCheckpointHandler(),
    "data": ocp.JsonCheckpointHandler(),
    CHECKSUMS_ITEM: ocp.JsonCheckpointHandler(),
  }


def _manager(directory):
  return ocp.CheckpointManager(
    directory,
    item_handlers=_item_handlers(),
    # The values read_only implies, given, so that Orbax does not warn that it sets them.
    options=ocp.CheckpointManagerOptions(
      read_only=True,
      save_interval_steps=0,
      max_to_keep=None,
      create=False,
      cleanup_tmp_directories=False,
    ),
  )


def read_step(directory: str | os.PathLike, step: int | None = None) -> tuple[int, Any, dict]:
  """(step, params, training config JSON) of checkpoint `step` under `directory`, or of the
  newest step that restores, onto this process's first device whatever mesh saved it.

  Read-only: an unreadable step is skipped with a warning, not moved aside.
  FileNotFoundError if none restores.
  """
  directory = storage.path(directory)
  manager = _read_only_manager(directory)
  steps = sorted(manager.all_steps(), reverse=True)
  if step is not None:
    if step not in steps:
      raise FileNotFoundError(f"No checkpoint {directory}/{step} (steps: {sorted(steps)})")
    steps = [step]
  for s in steps:
    try:
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        manager.item_metadata(s)["state"].tree,
      )
      items = dict(state=ocp.args.StandardRestore(target), config=ocp.args.JsonRestore())
      checked = _has_checksums(directory / str(s))
      if checked:
        items[CHECKSUMS_ITEM] = ocp.args.JsonRestore()
      restored = manager.restore(s, args=ocp.args.Composite(**items))
      if checked:
        verify(f"{directory}/{s}", restored[CHECKSUMS_ITEM], restored.state, None)
      return s, restored.state["params"], restored.config
    except Exception as e:  # noqa: BLE001 - any failure means "unreadable": fall back
      logging.warning(
        "Checkpoint %s/%d is unreadable (%s: %s); trying an earlier one.",
        directory,
        s,
        type(e).__name__,
        (str(e).splitlines() or [""])[0],
      )
  raise FileNotFoundError(
    f"No readable checkpoints under {directory}"
    + (f" (steps {steps} failed to restore)" if steps else "")
  )
