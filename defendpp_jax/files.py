"""Atomic writes of JSON, text and bytes: a crash mid-write leaves the previous file intact.

Usage:
  write_json('results/table2.json', result)
  write_text('results/table2.md', markdown)
  write_npz('runs/x/hgd_trainset.npz', adversarial=a, labels=y)
  write_bytes('results/models/x/variables.msgpack', data)
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np


def json_default(obj: Any) -> Any:
  """JSON for numpy scalars and arrays, tuples and sets; str() for anything else."""
  if isinstance(obj, (np.integer, np.floating)):
    return obj.item()
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  if isinstance(obj, (tuple, set)):
    return list(obj)
  return str(obj)


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` through a temporary file renamed into place."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
  """Writes `text` (UTF-8) to `path`, atomically."""
  write_bytes(path, text.encode('utf-8'))


def write_json(path: str, obj: Any, sort_keys: bool = False) -> None:
  """Writes `obj` as indented JSON to `path`, atomically."""
  write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=json_default))


def write_npz(path: str, **arrays: np.ndarray) -> None:
  """Writes `arrays` as an uncompressed .npz at `path` (exactly; no suffix added), atomically."""
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  write_bytes(path, buf.getvalue())


def write_generated(path: str, start: str, end: str, content: str, title: str) -> None:
  """Replaces the part of the document `path` between the markers `start` and `end` with
  `content` (appended, or a new document headed `title`, when the markers are absent)."""
  generated = f'{start}\n\n{content}\n{end}'
  if os.path.isfile(path):
    with open(path) as f:
      text = f.read()
    if start in text and end in text:
      head, rest = text.split(start, 1)
      text = head + generated + rest.split(end, 1)[1]
    else:
      text = text.rstrip('\n') + '\n\n' + generated + '\n'
  else:
    text = f'# {title}\n\n{generated}\n'
  write_text(path, text)
