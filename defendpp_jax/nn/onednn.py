"""oneDNN convolutions as XLA FFI calls on CPU (the convolution kernels PyTorch uses).

XLA:CPU's own convolutions take ~2x oneDNN's time on the classifiers' shapes
(docs/PERFORMANCE.md), and the convolutions are most of a training or attack step. This module
compiles `csrc/onednn_conv.cc` once (g++, against the pip packages `onednn-cpu-gomp` /
`onednn-devel-cpu-gomp` and the XLA FFI headers shipped with jaxlib) into a cache directory
(`$DEFENDPP_BUILD_DIR`, default `~/.cache/defendpp_jax`), registers three FFI targets and
exposes them as functions of jax arrays:

  y  = conv_fwd(x, w, strides, padding)                  # NHWC x, HWIO w, float32
  dx = conv_bwd_data(g, w, x_shape, strides, padding)    # input gradient
  dw = conv_bwd_weights(x, g, w_shape, strides, padding) # kernel gradient

`padding` is ((top, bottom), (left, right)). `available()` says whether the library could be
built and loaded, and if not, why. `nn.conv.conv_general_dilated` routes through these when the
model's `conv` is 'onednn' (or 'auto' on a single CPU device with the library available).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import os
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'csrc', 'onednn_conv.cc')
TARGETS = ('DppConvFwd', 'DppConvBwdData', 'DppConvBwdWeights')
_LOCK = threading.Lock()
_STATE: dict[str, str] = {}  # 'library': path once loaded, or 'error': why not


class OneDNNUnavailable(RuntimeError):
  """The oneDNN convolution library cannot be built or loaded here."""


def _package_file(dist: str, suffix: str) -> str:
  """Absolute path of the file of pip package `dist` whose path ends with `suffix`."""
  try:
    files = importlib.metadata.files(dist) or []
  except importlib.metadata.PackageNotFoundError:
    raise OneDNNUnavailable(f'pip package {dist} is not installed (pip install -r '
                            'requirements.txt installs it on Linux x86-64)') from None
  for f in files:
    if ('/' + str(f).replace(os.sep, '/')).endswith('/' + suffix):
      return str(f.locate())
  raise OneDNNUnavailable(f'pip package {dist} has no file ending in {suffix}')


def _build() -> str:
  """Compiles the FFI library (once per source / jaxlib / oneDNN version); returns its path."""
  header = _package_file('onednn-devel-cpu-gomp', 'oneapi/dnnl/dnnl.hpp')
  include = os.path.dirname(os.path.dirname(os.path.dirname(header)))
  lib = _package_file('onednn-cpu-gomp', 'libdnnl.so')
  lib_dir = os.path.dirname(lib)
  flags = ['-O2', '-std=c++17', '-shared', '-fPIC', '-w']
  with open(SOURCE, 'rb') as f:
    source = f.read()
  key = hashlib.sha256(b'\0'.join([
      source, jax.__version__.encode(), importlib.metadata.version('jaxlib').encode(),
      os.path.realpath(lib).encode(), ' '.join(flags).encode()])).hexdigest()[:16]
  build_dir = os.environ.get('DEFENDPP_BUILD_DIR') or os.path.join(
      os.path.expanduser('~'), '.cache', 'defendpp_jax')
  os.makedirs(build_dir, exist_ok=True)
  out = os.path.join(build_dir, f'onednn_conv-{key}.so')
  if os.path.isfile(out):
    return out
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=build_dir)
  os.close(fd)
  cmd = [os.environ.get('CXX', 'g++'), *flags, SOURCE, '-o', tmp, f'-I{include}',
         f'-I{jax.ffi.include_dir()}', f'-L{lib_dir}', '-ldnnl', f'-Wl,-rpath,{lib_dir}']
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  except FileNotFoundError:
    os.unlink(tmp)
    raise OneDNNUnavailable(f'no C++ compiler {cmd[0]!r} (set CXX) to build {SOURCE}') from None
  if proc.returncode:
    os.unlink(tmp)
    raise OneDNNUnavailable(f'building {SOURCE} failed:\n{" ".join(cmd)}\n{proc.stderr[-2000:]}')
  os.replace(tmp, out)  # atomic: a concurrent build never leaves a half-written library
  return out


def load() -> str:
  """Builds (if needed) and registers the FFI targets; returns the library's path."""
  with _LOCK:
    if 'library' in _STATE:
      return _STATE['library']
    if 'error' in _STATE:
      raise OneDNNUnavailable(_STATE['error'])
    try:
      path = _build()
      lib = ctypes.cdll.LoadLibrary(path)
      for name in TARGETS:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)),
                                    platform='cpu')
    except (OneDNNUnavailable, OSError) as e:
      _STATE['error'] = str(e)
      raise OneDNNUnavailable(str(e)) from None
    _STATE['library'] = path
    return path


def available() -> tuple[bool, str]:
  """(True, library path) or (False, the reason it cannot be used)."""
  try:
    return True, load()
  except OneDNNUnavailable as e:
    return False, str(e)


def _attrs(strides, padding) -> dict[str, np.int64]:
  (sh, sw), ((pt, pb), (pl, pr)) = strides, padding
  return {k: np.int64(v) for k, v in
          dict(sh=sh, sw=sw, pt=pt, pb=pb, pl=pl, pr=pr).items()}


def _call(target: str, shape, *args, strides, padding) -> jax.Array:
  load()
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(tuple(shape), jnp.float32),
                          vmap_method='sequential')(*args, **_attrs(strides, padding))


def output_shape(x_shape, w_shape, strides, padding) -> tuple[int, int, int, int]:
  n, h, w, _ = x_shape
  kh, kw, _, o = w_shape
  (sh, sw), ((pt, pb), (pl, pr)) = strides, padding
  return n, (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1, o


def _fold_batch(fn):
  """`fn(a, w)` (a: NHWC, w: HWIO) whose vmap over `a` alone folds the mapped axis into N: one
  oneDNN call on B x N images instead of B sequential calls (EOT vmaps a model over its draws).
  A batched `w` is mapped sequentially."""
  @jax.custom_batching.custom_vmap
  def f(a, w):
    return fn(a, w)

  @f.def_vmap
  def rule(axis_size, in_batched, a, w):
    a_batched, w_batched = in_batched
    if w_batched:
      a = a if a_batched else jnp.broadcast_to(a, (axis_size, *a.shape))
      return jax.lax.map(lambda aw: f(*aw), (a, w)), True
    out = f(a.reshape((-1, *a.shape[2:])), w)
    return out.reshape((axis_size, -1, *out.shape[1:])), True

  return f


def conv_fwd(x: jax.Array, w: jax.Array, strides, padding) -> jax.Array:
  return _fold_batch(lambda x, w: _call(
      'DppConvFwd', output_shape(x.shape, w.shape, strides, padding), x, w, strides=strides,
      padding=padding))(x, w)


def conv_bwd_data(g: jax.Array, w: jax.Array, x_shape, strides, padding) -> jax.Array:
  return _fold_batch(lambda g, w: _call(
      'DppConvBwdData', (g.shape[0], *x_shape[1:]), g, w, strides=strides,
      padding=padding))(g, w)


def conv_bwd_weights(x: jax.Array, g: jax.Array, w_shape, strides, padding) -> jax.Array:
  return _call('DppConvBwdWeights', w_shape, x, g, strides=strides, padding=padding)
