"""Throughput of the jitted paths: forward, training step, one attack step and a whole PGD-k.

  python -m launch.benchmark [--arch=resnet18 --width=16,64 --input=28x28x1,32x32x3 \
      --batch=128 --steps=10,100 --decoder=none --conv=auto --json] [--compare=torch]

Prints images per second (median of --repeats timed runs after one compiling run) and the compile
time separately. With --json, one JSON object per line:
  {"work": "forward"|"train_step"|"attack_step"|"pgd", "arch", "width", "input", "batch",
   "steps" (pgd, eot_pgd), "eot_samples", "eot_chunk", "temp_mb" (eot_pgd: XLA's temporary
   buffers of the program, MiB), "img_per_s", "compile_s", "framework",
   "conv" (JAX: the kernels the convolutions ran on, xla | onednn), "cpu" (model name and its
   vector / matrix extensions: the figures depend on the CPU kind)}
--eot=1,10 (default) times PGD-10 with EOT over k draws of a randomised defence (the classifier
behind Gaussian input noise) and prints EOT-k time / (k x EOT-1 time); --eot_chunk=c vmaps c
draws at a time (--eot_chunk=0,5: both; the chunks run one after another: memory stays that
of one chunk).
--hgd times HGD's denoiser training step against the classifier's (`python -m launch.benchmark
--hgd --width=8 --input=28x28x1,32x32x3 --batch=32`). --training_defences times the training
step of each training-time defence against the plain classifier's (`python -m launch.benchmark
--training_defences --width=8 --input=28x28x1 --batch=64`).
--autoattack times Square per 1,000 queries and `autoattack` end to end with a breakdown per
component (launch/benchmark_attacks.py: `python -m launch.benchmark --autoattack --width=16
--batch=250 --mnist_dir=../shared/data/mnist`).
--conv=xla,onednn measures the JAX model once per convolution backend (config.model.conv).
--compare=torch also runs the identical CIFAR-style architecture in PyTorch eager (training step,
forward, and torchattacks PGD when installed; see requirements-bench.txt). Time nothing else on
the machine while this runs: the figures would be wrong. --ops also times each distinct
convolution alone (forward, input gradient, weight gradient; records with "work": "conv_fwd" |
"conv_dgrad" | "conv_wgrad", "ms" per call and "count" per pass), which shows how much of a
training or attack step is convolution time; --conv_forms adds the same convolutions in two
other forms (NCHW layout; im2col + matmul), the alternatives docs/PERFORMANCE.md measures.
"""

from __future__ import annotations

import functools
import json
import time
import types

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from defendpp_jax import attacks
from defendpp_jax import defences
from defendpp_jax import nn as models
from defendpp_jax import parallel
from defendpp_jax import training
from defendpp_jax.nn import onednn
from defendpp_jax.runs import config as config_lib
from defendpp_jax.training import recipes
from launch import torch_resnet
from launch.timing import _time
from launch.timing import _time_eager
from launch.timing import cpu_kind

_ARCH = flags.DEFINE_string('arch', 'resnet18', 'Architecture.')
_WIDTH = flags.DEFINE_list('width', ['16'], 'Base widths.')
_INPUT = flags.DEFINE_list('input', ['28x28x1'], 'Input shapes HxWxC.')
_BATCH = flags.DEFINE_integer('batch', 128, 'Batch size.')
_STEPS = flags.DEFINE_list('steps', ['10'], 'PGD step counts k.')
_DECODER = flags.DEFINE_string('decoder', 'none', 'Decoder for the training step (none = plain).')
_REPEATS = flags.DEFINE_integer('repeats', 7, 'Timed runs per measurement (median).')
_JSON = flags.DEFINE_bool('json', False, 'One JSON object per line.')
_COMPARE = flags.DEFINE_enum('compare', None, ['torch'], 'Also measure PyTorch eager.')
_CONV_FORMS = flags.DEFINE_bool(
    'conv_forms', False, 'With --ops: also time each convolution written as NCHW / OIHW '
    '("framework": "jax-nchw") and as im2col + one matmul ("jax-im2col").')
_CONV = flags.DEFINE_list('conv', ['auto'], 'Convolution kernels of the JAX model, one '
                          'measurement each: auto | xla | onednn (config.model.conv).')
_PADDING = flags.DEFINE_enum('padding', 'torch', ['torch', 'same'], 'config.model.padding of the '
                             'JAX model (same: the padding of runs saved before the field).')
_EOT = flags.DEFINE_list('eot', ['1', '10'], 'EOT sample counts k of the EOT-PGD-10 '
                         'measurement (the classifier behind Gaussian input noise); "" = none.')
_EOT_CHUNK = flags.DEFINE_list('eot_chunk', ['0'], 'Draws of the EOT-PGD-10 runs vmapped at '
                               'a time, one measurement each (0: all k at once; the chunks run '
                               'one after another).')
_DEFENCES = flags.DEFINE_bool('defences', False, 'Instead: the survey\'s defences (forward of '
                              'each, TV vs scikit-image, quilting kNN vs the matmul ceiling, '
                              'EOT-k PGD per randomised defence; launch/benchmark_defences.py).')
_HGD = flags.DEFINE_bool('hgd', False, 'Instead: HGD\'s denoiser training step (DUNET at widths '
                         'w, 2w, 4w, 4w, 4w, losses pixel and lgd) next to the classifier\'s '
                         'training step, in one run (launch/benchmark_defences.py).')
_TRAINING = flags.DEFINE_bool('training_defences', False, 'Instead: the training step of each '
                              'training-time defence (distillation, parseval, cross_lipschitz, '
                              'deep_defense, adp, adv_bnn) next to the plain classifier\'s, in '
                              'one run (launch/benchmark_defences.py).')
_AUTOATTACK = flags.DEFINE_bool('autoattack', False, 'Instead: Square per 1,000 queries and '
                                'autoattack end to end on MNIST (launch/benchmark_attacks.py).')
_AA_IMAGES = flags.DEFINE_integer('aa_images', 1000, 'Test images autoattack runs on.')
_AA_EPS = flags.DEFINE_list('aa_eps', ['0.3'], 'L-inf eps of the autoattack runs (one run each: '
                            'at a small eps every component has images left to attack).')
_AA_WORKDIR = flags.DEFINE_string('aa_workdir', '', 'The trained MNIST run autoattack attacks '
                                  '(trained there first if empty of one).')
_MNIST_DIR = flags.DEFINE_string('mnist_dir', '', 'MNIST IDX files for --autoattack.')
_OPS = flags.DEFINE_bool('ops', False, 'Also time every distinct convolution of the classifier '
                         'alone: forward, input gradient, weight gradient (where the time goes).')


def _emit(record: dict) -> None:
  record = {**record, 'cpu': cpu_kind()}
  if _JSON.value:
    print(json.dumps(record), flush=True)
  else:
    extra = f' k={record["steps"]}' if 'steps' in record else ''
    extra += f' eot={record["eot_samples"]}' if 'eot_samples' in record else ''
    fw = record['framework'] + (f'/{record["conv"]}' if 'conv' in record else '')
    print(f'{fw:10s} {record["work"]:11s}{extra:6s} {record["arch"]} '
          f'w{record["width"]} {record["input"]} batch {record["batch"]}: '
          f'{record["img_per_s"]:9.1f} img/s (compile {record["compile_s"]:.1f} s'
          + (f', chunk {record["eot_chunk"]}, temporaries {record["temp_mb"]:.0f} MiB'
             if record.get('temp_mb') is not None else '') + ')', flush=True)


def _jax_setup(arch: str, width: int, shape: tuple[int, int, int], decoder: str, conv: str):
  """(model, recipe) of a Defend++ / plain classifier as the trainer builds it."""
  config = config_lib.get_base_config()
  config.model.update(arch=arch, width=width, shared_blocks=4 if arch != 'vgg16' else 2,
                      decoder=decoder, conv=conv, padding=_PADDING.value)
  config.train.update(learning_rate=0.01, lr_decay_epochs=(), num_epochs=1)
  ds = types.SimpleNamespace(num_classes=10, image_shape=shape, mean=(0.5,), std=(0.5,))
  recipe = recipes.classifier_recipe(config, ds, 1)
  return recipe.model, recipe


def bench_jax(arch: str, width: int, shape: tuple[int, int, int], batch: int,
              steps: list[int], decoder: str, repeats: int, conv: str = 'auto',
              eot: tuple[int, ...] = (), eot_chunks: tuple[int, ...] = (0,)) -> list[dict]:
  model, recipe = _jax_setup(arch, width, shape, decoder, conv)
  mesh = parallel.make_mesh()
  rng = np.random.default_rng(0)
  x_np = rng.uniform(size=(batch, *shape)).astype(np.float32)
  y_np = rng.integers(0, 10, batch).astype(np.int32)
  x, y = parallel.shard_batch(mesh, x_np, y_np)
  state = parallel.initial_state(recipe.init, jax.random.key(0), mesh)
  variables = state.variables
  base = {'arch': arch, 'width': width, 'input': 'x'.join(map(str, shape)), 'batch': batch,
          'framework': 'jax', 'conv': models.resolve_conv_backend(conv)}
  out = []

  forward = jax.jit(lambda v, x: model.apply(v, x, method='classify'))
  c, t = _time(lambda: forward(variables, x), repeats)
  out.append({**base, 'work': 'forward', 'img_per_s': batch / t, 'compile_s': c})

  step = training.jit_train_step(functools.partial(recipes.train_step, recipe=recipe), mesh)
  weights, key = jnp.ones(2), jax.random.key(1)
  holder = [state]

  def train_once():
    holder[0], m = step(holder[0], x, y, weights, key, None)  # the state buffer is donated
    return m['loss']

  c, t = _time(train_once, repeats)
  out.append({**base, 'work': 'train_step', 'img_per_s': batch / t, 'compile_s': c})
  variables = holder[0].variables  # the initial state's buffers were donated to the step

  def pgd_fn(k):
    return jax.jit(lambda v, x, y, key: attacks.pgd(
        functools.partial(model.apply, v, method='classify'), x, y, eps=0.3, step_size=0.01,
        num_steps=k, key=key, random_start=k > 1))

  one = pgd_fn(1)
  c, t = _time(lambda: one(variables, x, y, key), repeats)
  out.append({**base, 'work': 'attack_step', 'img_per_s': batch / t, 'compile_s': c})
  for k in steps:
    fn = pgd_fn(k)
    c, t = _time(lambda: fn(variables, x, y, key), max(2, repeats // 2) if k > 20 else repeats)
    out.append({**base, 'work': 'pgd', 'steps': k, 'img_per_s': batch / t, 'compile_s': c})
  out += _bench_eot(model, variables, x, y, key, eot, base, repeats, eot_chunks)
  return out


def _bench_eot(model, variables, x, y, key, eot, base, repeats, chunks=(0,)) -> list[dict]:
  """PGD-10 with EOT over k draws of input noise (the classifier behind Gaussian noise),
  for each of `chunks` draws vmapped at a time (0: all k), and the XLA temporaries of its
  program."""
  noisy = defences.preprocess(defences.gaussian_noise(0.1), defences.classifier_defence(
      model, variables, 'classifier'))
  out = []
  for k, c in sorted({(k, min(c or k, k)) for k in eot for c in chunks}):
    fn = jax.jit(lambda v, x, y, key, k=k, c=c: attacks.pgd(
        noisy.attack_model('eot', eot_samples=k, eot_chunk=c, variables=v), x, y, eps=0.3,
        step_size=0.03, num_steps=10, key=key))
    t0 = time.perf_counter()
    compiled = fn.lower(noisy.variables, x, y, key).compile()
    compile_s = time.perf_counter() - t0
    _, t = _time(lambda: compiled(noisy.variables, x, y, key), max(2, repeats // 2))
    memory = compiled.memory_analysis()
    out.append({**base, 'work': 'eot_pgd', 'steps': 10, 'eot_samples': k, 'eot_chunk': c,
                'img_per_s': x.shape[0] / t, 'compile_s': compile_s,
                'temp_mb': memory.temp_size_in_bytes / 2**20 if memory else None})
  return out


def bench_torch(width: int, shape: tuple[int, int, int], batch: int, steps: list[int],
                repeats: int) -> list[dict]:
  """The same CIFAR-style ResNet-18 in PyTorch eager (BatchNorm, SGD momentum)."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  h, w, c = shape
  net = torch_resnet.resnet18(width, c)
  opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
  x = torch.rand(batch, c, h, w)
  y = torch.randint(0, 10, (batch,))
  base = {'arch': 'resnet18', 'width': width, 'input': f'{h}x{w}x{c}', 'batch': batch,
          'framework': 'torch'}

  out = []
  net.eval()
  with torch.no_grad():
    t = _time_eager(lambda: net(x), repeats)
  out.append({**base, 'work': 'forward', 'img_per_s': batch / t, 'compile_s': 0.0})
  net.train()

  def train_once():
    opt.zero_grad()
    loss = nn.functional.cross_entropy(net(x), y)
    loss.backward()
    opt.step()

  t = _time_eager(train_once, repeats)
  out.append({**base, 'work': 'train_step', 'img_per_s': batch / t, 'compile_s': 0.0})
  net.eval()
  try:
    import torchattacks  # pylint: disable=g-import-not-at-top
  except ImportError:
    torchattacks = None
  for k in [1] + steps:
    if torchattacks is not None:
      atk = torchattacks.PGD(net, eps=0.3, alpha=0.01, steps=k, random_start=k > 1)
      run = lambda: atk(x, y)
    else:
      def run(k=k):
        xa = x.clone()
        for _ in range(k):
          xa.requires_grad_(True)
          loss = nn.functional.cross_entropy(net(xa), y)
          g, = torch.autograd.grad(loss, xa)
          xa = torch.min(torch.max(xa.detach() + 0.01 * g.sign(), x - 0.3), x + 0.3).clamp(0, 1)
        return xa
    t = _time_eager(run, max(2, repeats // 2) if k > 20 else repeats)
    rec = {**base, 'work': 'attack_step' if k == 1 else 'pgd', 'img_per_s': batch / t,
           'compile_s': 0.0, 'impl': 'torchattacks' if torchattacks else 'hand-written'}
    if k > 1:
      rec['steps'] = k
    out.append(rec)
  return out


def model_convs(arch: str, width: int, shape: tuple[int, int, int], batch: int
                ) -> list[tuple[dict, int]]:
  """The distinct convolutions of the classifier's forward pass, with how often each occurs."""
  cfg = ml_collections.ConfigDict({'arch': arch, 'width': width, 'shared_blocks': 1,
                                   'decoder': 'none', 'num_levels': 0, 'stem': 'auto'})
  model = models.build_model(cfg, 10, shape)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, *shape))))
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, method='classify'))(
      variables, jnp.zeros((batch, *shape)))
  counts: dict[tuple, int] = {}

  def walk(jp):
    for eqn in jp.eqns:
      if eqn.primitive.name == 'conv_general_dilated':
        key = (tuple(eqn.invars[0].aval.shape), tuple(eqn.invars[1].aval.shape),
               tuple(eqn.params['window_strides']), tuple(map(tuple, eqn.params['padding'])))
        counts[key] = counts.get(key, 0) + 1
      for p in eqn.params.values():
        for q in (p if isinstance(p, (list, tuple)) else [p]):
          if isinstance(q, jax.extend.core.ClosedJaxpr):
            walk(q.jaxpr)
          elif isinstance(q, jax.extend.core.Jaxpr):
            walk(q)

  walk(jaxpr.jaxpr)
  return [({'x': k[0], 'w': k[1], 'strides': k[2], 'padding': k[3]}, n)
          for k, n in counts.items()]


def conv_im2col(x: jax.Array, w: jax.Array, strides, padding) -> jax.Array:
  """The NHWC / HWIO convolution as im2col + one matmul (explicit `padding` pairs)."""
  kh, kw, c, o = w.shape
  (sh, sw), ((pt, pb), (pl, pr)) = strides, padding
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  oh, ow = (xp.shape[1] - kh) // sh + 1, (xp.shape[2] - kw) // sw + 1
  cols = jnp.concatenate([xp[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :]
                          for i in range(kh) for j in range(kw)], axis=-1)
  return jnp.dot(cols.reshape(-1, kh * kw * c), w.reshape(kh * kw * c, o)).reshape(
      x.shape[0], oh, ow, o)


def _conv_forms(conv: dict, x: jax.Array, w: jax.Array) -> dict:
  """framework label -> (f(x, w), x, w) for the convolution `conv` in each form timed."""
  dn = ('NHWC', 'HWIO', 'NHWC')

  def project(x, w, backend='xla'):
    return models.conv_general_dilated(x, w, conv['strides'], conv['padding'],
                                       dimension_numbers=dn, backend=backend)

  forms = {'jax': (project, x, w)}
  if 'onednn' in _CONV.value or 'auto' in _CONV.value and onednn.available()[0]:
    forms['jax-onednn'] = (functools.partial(project, backend='onednn'), x, w)
  if _CONV_FORMS.value:
    def nchw(x, w):
      return jax.lax.conv_general_dilated(x, w, conv['strides'], conv['padding'],
                                          dimension_numbers=('NCHW', 'OIHW', 'NCHW'))

    forms['jax-nchw'] = (nchw, jnp.transpose(x, (0, 3, 1, 2)), jnp.transpose(w, (3, 2, 0, 1)))
    forms['jax-im2col'] = (lambda x, w: conv_im2col(x, w, conv['strides'], conv['padding']),
                           x, w)
  return forms


def bench_convs(arch: str, width: int, shape: tuple[int, int, int], batch: int, repeats: int,
                torch_too: bool) -> list[dict]:
  """Seconds per call of each distinct conv: forward, input gradient and weight gradient.

  JAX runs the project's convolution (models.conv_general_dilated, NHWC / HWIO); PyTorch its
  NCHW conv2d and the two halves of its convolution backward. Weighted by how often each conv
  occurs, the sums say how much of a training step (fwd + dgrad + wgrad) or of an attack step
  (fwd + dgrad) is convolution time.
  """
  out = []
  rng = np.random.default_rng(0)
  for conv, count in model_convs(arch, width, shape, batch):
    x = jnp.asarray(rng.normal(size=conv['x']), jnp.float32)
    w = jnp.asarray(rng.normal(size=conv['w']), jnp.float32)
    base = {'arch': arch, 'width': width, 'input': 'x'.join(map(str, shape)), 'batch': batch,
            'conv_input': 'x'.join(map(str, conv['x'][1:])), 'kernel': 'x'.join(
                map(str, conv['w'])), 'stride': conv['strides'][0], 'count': count}
    for framework, (f, fx, fw) in _conv_forms(conv, x, w).items():
      g = jnp.ones(jax.eval_shape(f, fx, fw).shape, jnp.float32)
      fns = {'conv_fwd': jax.jit(f),
             'conv_dgrad': jax.jit(lambda x, w, g, f=f: jax.vjp(lambda x_: f(x_, w), x)[1](g)[0]),
             'conv_wgrad': jax.jit(lambda x, w, g, f=f: jax.vjp(lambda w_: f(x, w_), w)[1](g)[0])}
      for work, fn in fns.items():
        args = (fx, fw) if work == 'conv_fwd' else (fx, fw, g)
        c, t = _time(lambda fn=fn, args=args: fn(*args), repeats)
        out.append({**base, 'framework': framework, 'work': work, 'ms': 1e3 * t,
                    'compile_s': c})
    if torch_too:
      import torch  # pylint: disable=g-import-not-at-top
      tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
      tw = torch.from_numpy(np.asarray(w).transpose(3, 2, 0, 1).copy())
      pad = conv['w'][0] // 2
      stride = conv['strides'][0]
      ty = torch.nn.functional.conv2d(tx, tw, stride=stride, padding=pad)
      tg = torch.ones_like(ty)
      tfns = {'conv_fwd': lambda: torch.nn.functional.conv2d(tx, tw, stride=stride, padding=pad),
              'conv_dgrad': lambda: torch.nn.grad.conv2d_input(tx.shape, tw, tg, stride, pad),
              'conv_wgrad': lambda: torch.nn.grad.conv2d_weight(tx, tw.shape, tg, stride, pad)}
      for work, fn in tfns.items():
        with torch.no_grad():
          t = _time_eager(fn, repeats)
        out.append({**base, 'framework': 'torch', 'work': work, 'ms': 1e3 * t,
                    'compile_s': 0.0})
  return out


def _emit_convs(records: list[dict]) -> None:
  for r in records:
    if _JSON.value:
      print(json.dumps(r), flush=True)
    else:
      print(f'{r["framework"]:5s} {r["work"]:10s} x{r["count"]} {r["conv_input"]:>9s} '
            f'k {r["kernel"]:>12s} s{r["stride"]}: {r["ms"]:8.3f} ms', flush=True)
  if not _JSON.value:
    for fw in sorted({r['framework'] for r in records}):
      tot = {k: sum(r['ms'] * r['count'] for r in records
                    if r['framework'] == fw and r['work'] == k)
             for k in ('conv_fwd', 'conv_dgrad', 'conv_wgrad')}
      print(f'{fw:5s} all convs of one pass: ' + ', '.join(
          f'{k[5:]} {v:.1f} ms' for k, v in tot.items()) +
            f'; fwd+dgrad+wgrad {sum(tot.values()):.1f} ms', flush=True)


def _main_defences() -> None:
  from launch import benchmark_defences  # pylint: disable=g-import-not-at-top
  for shape_s in _INPUT.value:
    shape = tuple(int(v) for v in shape_s.split('x'))
    for width in (int(w) for w in _WIDTH.value):
      if _HGD.value:
        records = [r for conv in _CONV.value for r in benchmark_defences.bench_hgd(
            width, shape, _BATCH.value, _REPEATS.value, conv)]
      elif _TRAINING.value:
        records = [r for conv in _CONV.value for r in benchmark_defences.bench_training_defences(
            width, shape, _BATCH.value, _REPEATS.value, conv)]
      else:
        records = benchmark_defences.bench_defences(
            width, shape, _BATCH.value, tuple(int(k) for k in _EOT.value if k), _REPEATS.value)
      for r in records:
        r = {**r, 'cpu': cpu_kind()}
        if _JSON.value:
          print(json.dumps(r), flush=True)
        else:
          what = r.get('defence', r.get('loss', ''))
          what += f' eot={r["eot_samples"]}' if 'eot_samples' in r else ''
          print(f'{r["work"]:16s} {what:22s} w{width} {shape_s} batch {r["batch"]}: '
                f'{r["img_per_s"]:9.1f} img/s (compile {r["compile_s"]:.1f} s)', flush=True)
      if not _JSON.value:
        print(f'CPU: {cpu_kind()}\n  ' + '\n  '.join(benchmark_defences.ratios(records)),
              flush=True)


def _main_autoattack() -> None:
  from launch import benchmark_attacks  # pylint: disable=g-import-not-at-top
  for width in (int(w) for w in _WIDTH.value):
    records = [benchmark_attacks.bench_square(width, (28, 28, 1), _BATCH.value, 1000,
                                              _REPEATS.value)]
    records += benchmark_attacks.bench_autoattack(width, _BATCH.value, _AA_IMAGES.value,
                                                  _MNIST_DIR.value, _AA_WORKDIR.value,
                                                  tuple(float(e) for e in _AA_EPS.value))
    for r in records:
      r['cpu'] = cpu_kind()
      if _JSON.value:
        print(json.dumps(r), flush=True)
    if not _JSON.value:
      print(f'CPU: {cpu_kind()}\n' + '\n'.join(benchmark_attacks.lines(records)), flush=True)


def main(argv):
  del argv
  if _AUTOATTACK.value:
    _main_autoattack()
    return
  if _DEFENCES.value or _HGD.value or _TRAINING.value:
    _main_defences()
    return
  steps = [int(s) for s in _STEPS.value]
  for shape_s in _INPUT.value:
    shape = tuple(int(v) for v in shape_s.split('x'))
    for width in (int(w) for w in _WIDTH.value):
      eot = tuple(int(k) for k in _EOT.value if k)
      records = [r for conv in _CONV.value for r in bench_jax(
          _ARCH.value, width, shape, _BATCH.value, steps, _DECODER.value, _REPEATS.value, conv,
          eot, tuple(int(c) for c in _EOT_CHUNK.value))]
      if _COMPARE.value == 'torch':
        records += bench_torch(width, shape, _BATCH.value, steps, _REPEATS.value)
      if not _JSON.value:
        print(f'CPU: {cpu_kind()}', flush=True)
      for r in records:
        _emit(r)
      if _OPS.value:
        _emit_convs(bench_convs(_ARCH.value, width, shape, _BATCH.value, _REPEATS.value,
                                _COMPARE.value == 'torch'))
      if not _JSON.value:
        by = {(r['framework'], r.get('conv'), r['work'], r.get('steps')): r['img_per_s']
              for r in records}
        for conv in sorted({r['conv'] for r in records if r['framework'] == 'jax'}):
          jax_by = {(w, k): v for (f, c, w, k), v in by.items() if f == 'jax' and c == conv}
          torch_by = {(w, k): v for (f, _, w, k), v in by.items() if f == 'torch'}
          a = jax_by[('attack_step', None)]
          text = [f'attack_step / train_step = {a / jax_by[("train_step", None)]:.2f}']
          text += [f'PGD-{k} x {k} / attack_step = {jax_by[("pgd", k)] * k / a:.2f}'
                   for k in steps]
          eot_by = {(r['eot_samples'], r['eot_chunk']): r for r in records
                    if r['work'] == 'eot_pgd' and r['conv'] == conv}
          if (1, 1) in eot_by:
            one = eot_by[(1, 1)]['img_per_s']
            text += [f'EOT-{k} (chunk {c}) PGD-10 time / ({k} x EOT-1) = '
                     f'{one / (k * r["img_per_s"]):.2f}' for (k, c), r in eot_by.items() if k > 1]
          text += [f'EOT-{k} chunk {c} / chunk {k}: time '
                   f'{eot_by[(k, k)]["img_per_s"] / r["img_per_s"]:.2f}, temporaries '
                   f'{r["temp_mb"] / eot_by[(k, k)]["temp_mb"]:.2f}'
                   for (k, c), r in eot_by.items()
                   if c < k and (k, k) in eot_by and r['temp_mb'] and eot_by[(k, k)]['temp_mb']]
          text += [f'{w}{"-" + str(k) if k else ""} / torch = {v / torch_by[(w, k)]:.2f}'
                   for (w, k), v in jax_by.items() if (w, k) in torch_by]
          print(f'      jax/{conv} ratios: ' + '; '.join(text), flush=True)


if __name__ == '__main__':
  app.run(main)
