"""Figure 3's patch-embedding analysis (paper section 4.6): the math and the figure.

Each final-layer patch embedding is labelled with its patch's majority segmentation class and
mean valid depth; a fixed-size sample of them is projected to 2-D by t-SNE, and three numbers
say how the 2-D map is organised:
  10-NN class purity  the mean over points of the fraction of a point's 10 nearest neighbours
                      (itself excluded) in the t-SNE plane that share its class;
  random baseline     the same purity with the labels randomly permuted (it depends only on the
                      sample's class frequencies, so encoders analysed on the same patches share
                      it);
  planar depth R^2    of the least-squares plane depth ~ a + b x + c y over the t-SNE plane.
The paper reports 0.514 vs 0.453 purity (random 0.215) and R^2 0.463 vs 0.086 for Le MuMo JEPA
vs LeJEPA RGB on Waymo. training/analyze.py collects the embeddings and writes the files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from lemumo_jax.data.schema import IGNORE_LABEL

KNN = 10                # the paper's 10-NN purity
NUM_PERMUTATIONS = 5    # label permutations averaged for the random baseline


# ------------------------------------------------------------------------ patch targets


def _patch_blocks(values: np.ndarray, grid_hw: tuple[int, int], what: str) -> np.ndarray:
  """[..., H, W] -> [..., h, w, (H / h) * (W / w)]: each patch's pixels, H and W multiples of
  the grid."""
  height, width = values.shape[-2:]
  grid_h, grid_w = grid_hw
  if height % grid_h or width % grid_w:
    raise ValueError(f'the {what} map is {height}x{width}, not a whole number of pixels per '
                     f'patch of the {grid_h}x{grid_w} patch grid')
  lead = values.shape[:-2]
  blocks = values.reshape(*lead, grid_h, height // grid_h, grid_w, width // grid_w)
  blocks = np.moveaxis(blocks, -3, -2)  # [..., h, w, ph, pw]
  return blocks.reshape(*lead, grid_h, grid_w, -1)


def patch_majority_class(labels: np.ndarray, grid_hw: tuple[int, int],
                         num_classes: int) -> np.ndarray:
  """labels [..., H, W] (class indices, IGNORE_LABEL = unlabelled) -> [..., h, w] int64: the
  most frequent class among each patch's labelled pixels (the smallest index on a tie), -1 for
  a patch with none. H and W must be multiples of the grid."""
  blocks = _patch_blocks(np.asarray(labels), grid_hw, 'label').astype(np.int64)
  labelled = blocks != IGNORE_LABEL
  if np.any(labelled & ((blocks < 0) | (blocks >= num_classes))):
    raise ValueError(f'labels outside [0, {num_classes}) other than IGNORE_LABEL '
                     f'({IGNORE_LABEL}): {np.unique(blocks[labelled]).tolist()}')
  cells = blocks.shape[:-1]
  cell = np.broadcast_to(np.arange(int(np.prod(cells))).reshape(*cells, 1), blocks.shape)
  counts = np.bincount((cell * num_classes + blocks)[labelled],
                       minlength=int(np.prod(cells)) * num_classes).reshape(*cells, num_classes)
  return np.where(counts.sum(-1) > 0, np.argmax(counts, axis=-1), -1)


def patch_mean_depth(depth: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
  """depth [..., H, W] (metres, 0 = no return) -> [..., h, w] float64: the mean of each patch's
  valid (> 0, finite) values, 0 for a patch with none. H and W must be multiples of the grid."""
  blocks = _patch_blocks(np.asarray(depth, np.float64), grid_hw, 'depth')
  valid = np.isfinite(blocks) & (blocks > 0)
  total = np.sum(np.where(valid, blocks, 0.0), axis=-1)
  count = np.sum(valid, axis=-1)
  return np.divide(total, count, out=np.zeros_like(total), where=count > 0)


# ---------------------------------------------------------------------------- statistics


def knn_class_purity(coords: np.ndarray, labels: np.ndarray, k: int = KNN,
                     chunk: int = 256) -> float:
  """coords [N, d], labels [N] -> the mean over points of the fraction of each point's k
  nearest neighbours (Euclidean, itself excluded) that share its label. Exact (brute force in
  float64, `chunk` rows at a time); ties at the k-th distance are broken arbitrarily."""
  coords = np.asarray(coords, np.float64)
  labels = np.asarray(labels)
  n = len(coords)
  if not 0 < k < n:
    raise ValueError(f'k={k} nearest neighbours need more than k points, got {n}')
  same = 0.0
  for start in range(0, n, chunk):
    rows = np.arange(start, min(start + chunk, n))
    dist = np.sum((coords[rows, None, :] - coords[None, :, :])**2, axis=-1)
    dist[np.arange(len(rows)), rows] = np.inf
    neighbours = np.argpartition(dist, k - 1, axis=1)[:, :k]
    same += float(np.sum(labels[neighbours] == labels[rows, None]))
  return same / (n * k)


def permuted_purity(coords: np.ndarray, labels: np.ndarray, k: int = KNN,
                    num_permutations: int = NUM_PERMUTATIONS, seed: int = 0) -> float:
  """The random same-class baseline: knn_class_purity with the labels randomly permuted,
  averaged over num_permutations fixed-seed permutations."""
  rng = np.random.default_rng(seed)
  labels = np.asarray(labels)
  return float(np.mean([knn_class_purity(coords, rng.permutation(labels), k)
                        for _ in range(num_permutations)]))


def planar_r2(coords: np.ndarray, values: np.ndarray) -> float:
  """R^2 of the least-squares plane values ~ a + b x + c y over coords [N, 2] (values [N])."""
  coords = np.asarray(coords, np.float64)
  values = np.asarray(values, np.float64)
  design = np.column_stack([np.ones(len(coords)), coords])
  solution, *_ = np.linalg.lstsq(design, values, rcond=None)
  residual = values - design @ solution
  total = np.sum((values - values.mean())**2)
  if total == 0:
    raise ValueError('planar_r2: the values are constant, R^2 is undefined')
  return float(1.0 - np.sum(residual**2) / total)


def tsne_2d(features: np.ndarray, *, perplexity: float, max_iter: int, seed: int) -> np.ndarray:
  """features [N, D] -> [N, 2] t-SNE coordinates (sklearn, PCA init, fixed random_state)."""
  from sklearn.manifold import TSNE  # pylint: disable=g-import-not-at-top
  if not 0 < perplexity < len(features):
    raise ValueError(f'config.analyze.perplexity={perplexity} must be below the number of '
                     f'points ({len(features)})')
  tsne = TSNE(n_components=2, perplexity=perplexity, max_iter=max_iter, init='pca',
              learning_rate='auto', random_state=seed)
  return tsne.fit_transform(np.asarray(features, np.float32)).astype(np.float64)


class BottomKSample:
  """A uniform sample without replacement of at most `size` items of a stream: every item
  comes with a random priority and the `size` smallest are kept (bottom-k sampling), in
  O(size) memory. `result()` returns the kept items in arrival order."""

  def __init__(self, size: int):
    if size < 1:
      raise ValueError(f'config.analyze.num_points must be positive, got {size}')
    self.size = size
    self.seen = 0
    self._priority = np.empty(0)
    self._arrival = np.empty(0, np.int64)
    self._columns: dict[str, np.ndarray] = {}

  def add(self, priority: np.ndarray, **columns: np.ndarray) -> None:
    """priority [n], columns [n, ...] (the same keys on every call)."""
    n = len(priority)
    arrival = np.arange(self.seen, self.seen + n)
    self.seen += n
    priority = np.concatenate([self._priority, priority])
    keep = np.argsort(priority, kind='stable')[:self.size]
    self._priority = priority[keep]
    self._arrival = np.concatenate([self._arrival, arrival])[keep]
    for key, value in columns.items():
      previous = self._columns.get(key, value[:0])
      self._columns[key] = np.concatenate([previous, value])[keep]

  def result(self) -> dict[str, np.ndarray]:
    order = np.argsort(self._arrival)
    return {k: v[order] for k, v in self._columns.items()}


# -------------------------------------------------------------------------------- figure


def save_figure(path: str, panels: Sequence[dict[str, Any]], classes: np.ndarray,
                depth: np.ndarray, class_names: Sequence[str]) -> None:
  """Figure 3's layout: one column per encoder (panel: label, coords [N, 2], purity_10nn,
  purity_random, planar_r2); the top row coloured by class, the bottom by depth (metres).
  Written to path via a temporary file and a rename."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top

  cols = len(panels)
  # A narrow last column holds the class legend (top) and the depth colour bar (bottom), so
  # every encoder's panels have the same size.
  fig, axes = plt.subplots(2, cols + 1, figsize=(4.6 * cols + 1.9, 8.4), squeeze=False,
                           gridspec_kw={'width_ratios': [1.0] * cols + [0.07]})
  cmap = plt.get_cmap('tab10' if len(class_names) <= 10 else 'tab20')
  class_colour = lambda k: cmap(k % cmap.N)
  # The colour scale stops at the 98th percentile: a few far patches would wash out the rest.
  low, high = float(np.min(depth)), float(np.percentile(depth, 98))
  for c, panel in enumerate(panels):
    x, y = panel['coords'][:, 0], panel['coords'][:, 1]
    top, bottom = axes[0][c], axes[1][c]
    top.scatter(x, y, c=[class_colour(int(k)) for k in classes], s=4, linewidths=0)
    top.set_title(f'{panel["label"]}\n10-NN class purity {panel["purity_10nn"]:.3f} '
                  f'(random {panel["purity_random"]:.3f})', fontsize=9)
    points = bottom.scatter(x, y, c=depth, cmap='viridis_r', vmin=low, vmax=high, s=4,
                            linewidths=0)
    bottom.set_title(f'planar depth fit R$^2$ {panel["planar_r2"]:.3f}', fontsize=9)
    for ax in (top, bottom):
      ax.set_xticks([])
      ax.set_yticks([])
  axes[0][0].set_ylabel('class', fontsize=9)
  axes[1][0].set_ylabel('depth', fontsize=9)
  handles = [Line2D([], [], marker='o', linestyle='', markersize=5, color=class_colour(int(k)),
                    label=class_names[int(k)] if int(k) < len(class_names) else str(int(k)))
             for k in np.unique(classes)]
  axes[0][-1].set_axis_off()
  axes[0][-1].legend(handles=handles, loc='center left', bbox_to_anchor=(-0.5, 0.5),
                     fontsize=8, frameon=False)
  fig.colorbar(points, cax=axes[1][-1], label='mean patch depth (m)', extend='max')
  fig.suptitle('t-SNE of final-layer patch embeddings (val split)', fontsize=10)
  fig.tight_layout()
  tmp = path + '.tmp.png'
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, path)
