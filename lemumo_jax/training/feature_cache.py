"""probe.cache_features: the frozen encoder's patch grids, computed once, kept on the host."""

from __future__ import annotations

from collections.abc import Iterator

import jax
import numpy as np

from lemumo_jax.data import pipeline, sources

class FeatureCache:
  """probe.cache_features: the frozen encoder's patch grid of every train and val frame,
  computed once, with the frames' targets, in host memory.

  Probe views are deterministic and the encoder is frozen, so every epoch would feed the heads
  the same grids: cached, a probe step costs only the heads' forward and backward. Train
  batches follow the rendering loader's order (pipeline.training_positions), so a cached run
  sees the same frames at every step as an uncached one and gives the same numbers. Each host
  caches its own records; one that would need more than probe.cache_max_gib is an error after
  the first batch, before any probe file is written.
  """

  # What the heads never read again once the grid is cached (the val cache keeps 'rgb' for
  # the figure).
  TRAIN_DROP = ('rgb', 'companion')
  VAL_DROP = ('companion',)

  def __init__(self, train: dict[str, np.ndarray], val: list[dict[str, np.ndarray]]):
    self.train, self.val = train, val
    self.num_train = len(train['patches'])

  @property
  def nbytes(self) -> int:
    return (sum(v.nbytes for v in self.train.values())
            + sum(v.nbytes for batch in self.val for v in batch.values()))

  @classmethod
  def build(cls, data_cfg, frame: pipeline.ProbeFrame, batch_size: int, host_features,
            max_gib: float) -> 'FeatureCache':
    """host_features(host_batch) -> this host's rows of the frozen grid (numpy)."""
    metadata = sources.dataset_metadata(data_cfg)
    host_frames = {split: pipeline.host_record_count(int(metadata['splits'][split]))
                   for split in ('train', 'val')}
    budget = max_gib * 2**30
    parts: dict[str, list[np.ndarray]] = {}
    for i, host_batch in enumerate(pipeline.probe_eval_loader(data_cfg, frame, batch_size,
                                                              split='train')):
      batch = dict(host_batch, patches=host_features(host_batch))
      valid = batch['valid'] > 0
      if i == 0:
        cls._check_budget(batch, host_frames, budget, max_gib)
      for key, value in batch.items():
        if key not in cls.TRAIN_DROP:
          parts.setdefault(key, []).append(value[valid])
    train = {k: np.concatenate(v) for k, v in parts.items()}
    if len(train['patches']) != host_frames['train']:
      raise RuntimeError(f'the train split gave {len(train["patches"])} frames on host '
                         f'{jax.process_index()}, its metadata says {host_frames["train"]}')
    val = []
    for host_batch in pipeline.probe_eval_loader(data_cfg, frame, batch_size):
      batch = dict(host_batch, patches=host_features(host_batch))
      val.append({k: v for k, v in batch.items() if k not in cls.VAL_DROP})
    return cls(train, val)

  @classmethod
  def _check_budget(cls, batch, host_frames, budget: float, max_gib: float) -> None:
    frame_bytes = {k: v[0].nbytes for k, v in batch.items()}
    train = sum(b for k, b in frame_bytes.items() if k not in cls.TRAIN_DROP)
    val = sum(b for k, b in frame_bytes.items() if k not in cls.VAL_DROP)
    size = train * host_frames['train'] + val * (host_frames['val'] + len(batch['valid']))
    if size > budget:
      raise ValueError(
          f'config.probe.cache_features: the frozen features and targets of '
          f'{host_frames["train"]} train + {host_frames["val"]} val frames need '
          f'{size / 2**30:.3g} GiB per host ({train / 2**20:.2f} MiB per frame, patch grid '
          f'{tuple(batch["patches"].shape[1:])}), over config.probe.cache_max_gib={max_gib}; '
          f'raise the limit or set config.probe.cache_features=False')

  def train_batches(self, batch_size: int, *, seed: int, start_step: int,
                    num_steps: int) -> Iterator[dict[str, np.ndarray]]:
    for positions in pipeline.training_positions(self.num_train, batch_size, seed=seed,
                                                 start_step=start_step, num_steps=num_steps):
      yield {k: v[positions] for k, v in self.train.items()}

  def val_batches(self) -> Iterator[dict[str, np.ndarray]]:
    return iter(self.val)


def host_rows(x: jax.Array) -> np.ndarray:
  """A batch-sharded global array -> this host's rows, in the order the host fed them."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  shards = {s.index[0].start or 0: s for s in x.addressable_shards}  # replicas share a start
  return np.concatenate([np.asarray(shards[start].data) for start in sorted(shards)])
