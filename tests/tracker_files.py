"""Readers for what the trackers write, so tests can check it without the trackers' own (heavy) readers."""

import glob
import json
import os
import pathlib
import struct


def tensorboard_events(logdir) -> list:
  """Every `Event` in the TFRecord event files under `logdir`, in file order."""
  from tensorboardX.proto import event_pb2

  events = []
  for path in sorted(glob.glob(os.path.join(logdir, 'events.out.tfevents.*'))):
    data = pathlib.Path(path).read_bytes()
    pos = 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack('<Q', data[pos : pos + 8])
      payload = data[pos + 12 : pos + 12 + length]
      pos += 12 + length + 4  # length, its crc, the payload, its crc
      event = event_pb2.Event()
      event.ParseFromString(payload)
      events.append(event)
  return events


def tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
  scalars: dict[str, list[tuple[int, float]]] = {}
  for event in tensorboard_events(logdir):
    for value in event.summary.value:
      if value.HasField('simple_value'):
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def tensorboard_tags(logdir, kind: str) -> set[str]:
  """Tags of the summary values holding `kind` ('image' or 'tensor' for text)."""
  return {v.tag for e in tensorboard_events(logdir) for v in e.summary.value if v.HasField(kind)}


def _leveldb_records(data: bytes):
  """Records of a LevelDB-style log (wandb's .wandb files): 32 KiB blocks of (crc, length, type) chunks."""
  block, pos, pending = 32768, 7, b''  # the file starts with a 7-byte header (':W&B', magic, version)
  while pos + 7 <= len(data):
    left = block - pos % block
    if left < 7:
      pos += left
      continue
    _, length, kind = struct.unpack('<IHB', data[pos : pos + 7])
    if length == 0 and kind == 0:
      pos += left
      continue
    chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
    if kind == 1:
      yield chunk
    elif kind == 2:
      pending = chunk
    elif kind == 3:
      pending += chunk
    elif kind == 4:
      yield pending + chunk


def wandb_runs(workdir, run_id) -> list[dict]:
  """Per offline run folder of `run_id` under workdir/wandb (in time order): its history rows, config, summary."""
  from wandb.proto import wandb_internal_pb2

  runs = []
  for path in sorted(glob.glob(os.path.join(workdir, 'wandb', f'offline-run-*-{run_id}', f'run-{run_id}.wandb'))):
    history, config, summary = [], {}, {}
    for raw in _leveldb_records(pathlib.Path(path).read_bytes()):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(raw)
      kind = record.WhichOneof('record_type')
      if kind == 'history':
        history.append(
          {item.key or '/'.join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        )
      elif kind == 'run':
        config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
      elif kind == 'config':
        config.update({item.key: json.loads(item.value_json) for item in record.config.update})
      elif kind == 'summary':
        summary.update(
          {item.key or '/'.join(item.nested_key): json.loads(item.value_json) for item in record.summary.update}
        )
    runs.append({'history': history, 'config': config, 'summary': summary})
  return runs
