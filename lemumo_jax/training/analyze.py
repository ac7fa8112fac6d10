"""mode=analyze: Figure 3 of the paper (section 4.6) for a row's frozen encoder.

The exported encoder (probe.encoder_dir, default <workdir>/encoder; checked against config.model
like the probe stage's) and, with analyze.reference_dir, a second encoder of another row (read
with its own exported model config: it takes RGB only or both inputs as it was pretrained) run
on the probe stage's deterministic clean views of the val split. Each patch of the grid gets
its majority segmentation class (over its labelled pixels of the view) and its mean valid depth
(over its valid cells of the depth probe's target); patches without either are dropped. A
fixed-seed uniform sample of analyze.num_points such patches, the same frames and positions for
both encoders, is projected by t-SNE per encoder and scored (evaluation/embedding_analysis.py).

Files under <workdir>/analysis: figure3.png (rows: class-coloured, depth-coloured; one column
per encoder) and analysis.json, both written atomically.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lemumo_jax import files
from lemumo_jax.data import augment, pipeline, sources
from lemumo_jax.evaluation import embedding_analysis as ea
from lemumo_jax.training import pretrained, probe
from lemumo_jax.training import state as state_lib

# Paper names of the method rows (configs/common.py METHODS) for the figure's column titles.
DISPLAY_NAMES = {
    'lemumo': 'Le MuMo JEPA', 'lemumo_masked': 'Le MuMo JEPA (masked layer 0)',
    'ft_persistent': 'FT-Persistent + SIGReg', 'lejepa_rgb': 'LeJEPA RGB',
    'lidar_only': 'LiDAR-only JEPA', 'lemumo_vicreg': 'FT-Pruned + VICReg',
    'lemumo_3pass': 'FT-Pruned + SIGReg (3-pass)', 'early_fusion': 'Early Fusion RGBD',
    'late_fusion': 'Late Fusion', 'imagebind': 'ImageBind', 'dinov3': 'DINOv3',
    'multimae_ss': 'MultiMAE-SS', 'multimae_mt': 'MultiMAE-MT',
}


def encoder_label(method: str, model_cfg) -> str:
  """'<paper name> <what its patch grid is>', e.g. 'Le MuMo JEPA fusion tokens'."""
  family = model_cfg['family']
  tokens = {'fusion': 'fusion tokens', 'dual': 'RGB patch tokens',
            'multimae': 'RGB patch tokens'}.get(family, 'patch tokens')
  return f'{DISPLAY_NAMES.get(method, method)} {tokens}'


def _exported_meta(directory: str, key: str) -> dict[str, Any]:
  meta = state_lib.read_encoder_config(directory)  # a truncated file is named
  if meta is None:
    path = os.path.join(directory, 'encoder_config.json')
    raise FileNotFoundError(f'{path} not found (config.{key}={directory!r}): point it at the '
                            f'encoder/ directory a pretraining run exported')
  return meta


def _describe(role: str, directory: str, key: str, loaded, label: str) -> dict[str, Any]:
  module, params, model_cfg = loaded
  meta = _exported_meta(directory, key)
  method = meta.get('method', '?')
  return {'role': role, 'label': label or encoder_label(method, model_cfg), 'method': method,
          'family': model_cfg['family'], 'encoder_dir': directory, 'step': meta.get('step'),
          'module': module, 'params': params, 'model_cfg': model_cfg}


def _load_encoders(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
  """[the row's encoder, the reference encoder (with analyze.reference_dir)], each a dict with
  role, label, method, family, encoder_dir, step, module, params, model_cfg."""
  row_dir = pretrained.resolve_dir(config.probe.encoder_dir, 'probe.encoder_dir', workdir)
  encoders = [_describe('row', row_dir, 'probe.encoder_dir',
                        pretrained.load_encoder(row_dir, config.model, 'probe.encoder_dir',
                                                config.method),
                        config.analyze.label)]
  if config.analyze.reference_dir:
    ref_dir = os.path.abspath(config.analyze.reference_dir)
    _exported_meta(ref_dir, 'analyze.reference_dir')  # a missing encoder names the key
    # Another row's encoder: its own exported model config, not config.model.
    reference = state_lib.load_encoder(ref_dir, pretrained.run_compute(config.model))
    encoders.append(_describe('reference', ref_dir, 'analyze.reference_dir', reference,
                              config.analyze.reference_label))
  return encoders


def _patch_fn(module, view_cfg: augment.ViewConfig):
  """jitted (params, rgb [B, H, W, 3] uint8, companion [B, H, W]) -> patches [B, h, w, D]
  float32: the probe stage's readout (probe.frozen_features_fn)."""
  features = probe.frozen_features_fn(module, view_cfg)
  return jax.jit(lambda params, rgb, companion: features(
      params, {'rgb': rgb, 'companion': companion}).astype(jnp.float32))


def _check_grids(encoders, image_hw, grid_hw) -> None:
  """Every encoder must give the same patch grid: the same patches are compared."""
  for enc in encoders:
    channels = int(enc['model_cfg']['companion_channels'])
    shape = jax.eval_shape(
        lambda p, m=enc['module'], c=channels: m.apply(
            {'params': p}, jnp.zeros((1, *image_hw, 3)), jnp.zeros((1, *image_hw, c)),
            train=False).patches, enc['params']).shape
    if tuple(shape[1:3]) != tuple(grid_hw):
      raise ValueError(
          f'the encoder in {enc["encoder_dir"]} gives a {shape[1]}x{shape[2]} patch grid on the '
          f'{image_hw[0]}x{image_hw[1]} probe view (patch size {enc["model_cfg"]["patch_size"]}), '
          f'the row\'s encoder {grid_hw[0]}x{grid_hw[1]}: Figure 3 compares the same patches, so '
          f'config.analyze.reference_dir needs an encoder of the same patch size')


def collect(config, encoders, geometry: pipeline.ProbeGeometry,
            num_classes: int) -> dict[str, Any]:
  """One pass over the val split -> {'points': the sampled patches ('class', 'depth' and
  'features<i>' [n, D] of encoder i, all in split order), 'labelled_patches', 'frames'}."""
  cfg = config.analyze
  grid_hw = geometry.grid_hw
  frame = pipeline.ProbeFrame(geometry, ('seg', 'depth'), 0, 0, int(config.probe.max_objects),
                              int(config.probe.max_gt_boxes))
  view_cfg = augment.ViewConfig.from_config(config.views)
  patch_fns = [_patch_fn(enc['module'], view_cfg) for enc in encoders]
  params = [jax.device_put(enc['params']) for enc in encoders]
  metadata = sources.dataset_metadata(config.data)
  num_val = int(metadata['splits']['val'])
  limit = min(num_val, int(cfg.max_frames)) if cfg.max_frames > 0 else num_val
  batch_size = int(config.probe.batch_size)
  num_batches = -(-limit // batch_size)
  report_every = max(1, num_batches // 10)
  sample = ea.BottomKSample(int(cfg.num_points))
  frames, start = 0, time.perf_counter()
  for i, batch in enumerate(pipeline.probe_eval_loader(config.data, frame, batch_size)):
    if i >= num_batches:
      break
    index = i * batch_size + np.arange(len(batch['valid']))
    valid = (batch['valid'] > 0) & (index < limit)
    classes = ea.patch_majority_class(batch['seg'], grid_hw, num_classes)
    depth = ea.patch_mean_depth(batch['depth'], grid_hw)
    keep = valid[:, None, None] & (classes >= 0) & (depth > 0)
    # Priorities for every patch of the batch, kept or not: the sample depends on the seed and
    # the split's order only.
    priority = np.random.default_rng([int(cfg.seed), i]).random(keep.shape)
    grids = [np.asarray(fn(p, batch['rgb'], batch['companion']))
             for fn, p in zip(patch_fns, params)]
    sample.add(priority[keep], **{'class': classes[keep], 'depth': depth[keep]},
               **{f'features{j}': g[keep] for j, g in enumerate(grids)})
    frames += int(valid.sum())
    if (i + 1) % report_every == 0 or i + 1 == num_batches:
      print(f'analyze: {frames}/{limit} val frames, {sample.seen} patches with a class and a '
            f'depth ({time.perf_counter() - start:.0f} s)', flush=True)
  if sample.seen == 0:
    raise ValueError(f'no val patch of {config.data.data_dir or "synthetic"} has both a '
                     f'segmentation label and a valid depth target: Figure 3 needs both')
  return {'points': sample.result(), 'labelled_patches': sample.seen, 'frames': frames}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Writes <workdir>/analysis/{figure3.png, analysis.json}; returns analysis.json's content
  with 'figure' and 'json' paths added."""
  if jax.process_count() > 1:
    raise ValueError('mode=analyze runs in one process; start it without --distributed')
  workdir = os.path.abspath(workdir)
  cfg = config.analyze
  metadata = sources.dataset_metadata(config.data)
  seg_classes = list(metadata.get('seg_classes') or ())
  if not seg_classes:
    raise ValueError(f'mode=analyze needs seg_classes in the dataset metadata '
                     f'({config.data.data_dir or "synthetic"}) for the class purity; this '
                     f'dataset has none')
  encoders = _load_encoders(config, workdir)
  image_hw = tuple(int(v) for v in config.probe.image_size)
  # Labels at the view's own resolution: every patch covers patch_size^2 label pixels.
  geometry = pipeline.ProbeGeometry.create(image_hw, int(encoders[0]['model_cfg']['patch_size']),
                                           image_hw)
  _check_grids(encoders, image_hw, geometry.grid_hw)
  print(f'analyze: {" vs ".join(e["label"] for e in encoders)} on the val split, '
        f'{image_hw[0]}x{image_hw[1]} clean views -> {geometry.grid_hw[0]}x'
        f'{geometry.grid_hw[1]} patches', flush=True)
  collected = collect(config, encoders, geometry, len(seg_classes))
  points = collected['points']
  num_points = len(points['class'])
  if num_points <= ea.KNN:
    raise ValueError(f'only {num_points} val patches have a class and a depth; the 10-NN '
                     f'purity needs more than {ea.KNN}')
  tsne = {'n_components': 2, 'perplexity': float(cfg.perplexity), 'max_iter': int(cfg.max_iter),
          'init': 'pca', 'learning_rate': 'auto', 'metric': 'euclidean',
          'random_state': int(cfg.seed)}
  results, panels = [], []
  for j, enc in enumerate(encoders):
    start = time.perf_counter()
    coords = ea.tsne_2d(points[f'features{j}'], perplexity=tsne['perplexity'],
                        max_iter=tsne['max_iter'], seed=tsne['random_state'])
    numbers = {'purity_10nn': ea.knn_class_purity(coords, points['class']),
               'purity_random': ea.permuted_purity(coords, points['class'], seed=int(cfg.seed)),
               'planar_r2': ea.planar_r2(coords, points['depth'])}
    results.append({'role': enc['role'], 'label': enc['label'], 'method': enc['method'],
                    'family': enc['family'], 'encoder_dir': enc['encoder_dir'],
                    'step': enc['step'], 'feature_dim': int(points[f'features{j}'].shape[1]),
                    'num_points': num_points, **numbers, 'tsne': tsne})
    panels.append({'label': enc['label'], 'coords': coords, **numbers})
    print(f'{enc["label"]}: 10-NN class purity {numbers["purity_10nn"]:.3f} (random '
          f'{numbers["purity_random"]:.3f}), planar depth R^2 {numbers["planar_r2"]:.3f} on '
          f'{num_points} patches (t-SNE {time.perf_counter() - start:.0f} s)', flush=True)

  out_dir = os.path.join(workdir, 'analysis')
  os.makedirs(out_dir, exist_ok=True)
  counts = np.bincount(points['class'], minlength=len(seg_classes))
  payload = {
      'dataset': metadata.get('dataset', config.data.name),
      'data_dir': config.data.data_dir,
      'split': 'val',
      'frames': collected['frames'],
      'val_frames': int(metadata['splits']['val']),
      'probe_view': list(image_hw),
      'patch_grid': list(geometry.grid_hw),
      'seg_classes': seg_classes,
      'labelled_patches': collected['labelled_patches'],
      'num_points': num_points,
      'sample_seed': int(cfg.seed),
      'class_counts': {name: int(n) for name, n in zip(seg_classes, counts) if n},
      'depth_range': [float(points['depth'].min()), float(points['depth'].max())],
      'knn': ea.KNN,
      'random_permutations': ea.NUM_PERMUTATIONS,
      'encoders': results,
  }
  figure = os.path.join(out_dir, 'figure3.png')
  ea.save_figure(figure, panels, points['class'], points['depth'], seg_classes)
  path = os.path.join(out_dir, 'analysis.json')
  files.write_json_atomic(path, payload)
  print(f'Figure 3: {figure} (numbers: {path})', flush=True)
  return dict(payload, figure=figure, json=path)
