"""Finding and checking an exported encoder for the stages that load one (probe, finetune).

An exported encoder (state.export_encoder) is a directory with Orbax params and
encoder_config.json, which holds the model config it was pretrained with. Loading it into a
run checks that config against the run's config.model, so a transfer from another dataset's
run (Waymo -> FLIR) uses the same architecture the row names, or fails saying what differs.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from lemumo_jax import files
from lemumo_jax.training import state as state_lib


def resolve_dir(value: str | None, key: str, workdir: str) -> str:
  """The encoder directory config.<key> names; '' is <workdir>/encoder, None (the transfer and
  finetune regimes' placeholder) is an error."""
  if value is None:
    raise ValueError(f'config.{key} is not set: this regime loads an encoder pretrained in '
                     f'another run; pass --config.{key}=<that run\'s workdir>/encoder')
  return os.path.abspath(value) if value else state_lib.encoder_dir(workdir)


# Keys that choose how the encoder computes, not what it is: the exported encoder keeps its own
# (a bf16-pretrained encoder probed in a float32 config runs in bf16; both layer-0 kernels are
# tested equal), so they may differ without error; the attention kernel and rematerialisation
# are this run's (RUN_COMPUTE_KEYS: an encoder pretrained with cuDNN attention is probed on a
# CPU with XLA's).
RUN_COMPUTE_KEYS = ('attention', 'remat')
COMPUTE_ONLY_KEYS = frozenset({'dtype', 'layer0_impl', *RUN_COMPUTE_KEYS})


def model_mismatches(exported: dict[str, Any],
                     model_cfg: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
  """{key: (exported value, config.model value)} over the architecture keys both configs have
  (COMPUTE_ONLY_KEYS are not compared)."""
  current = files.as_json(model_cfg)
  keys = (set(exported) & set(current)) - COMPUTE_ONLY_KEYS
  return {k: (exported[k], current[k]) for k in sorted(keys) if exported[k] != current[k]}


def load_encoder(directory: str, model_cfg: ml_collections.ConfigDict, key: str,
                 method: str | None = None):
  """(module, params, exported model config) of the encoder in `directory`.

  Raises FileNotFoundError when it holds no exported encoder and ValueError when its model
  config differs from `model_cfg` (config.model) in any key both have, or when it was
  pretrained as another row than `method` (config.method: the report would carry that row's
  name), or when its params do not match its fingerprint (state.verified_params).
  """
  meta = state_lib.read_encoder_config(directory)
  if meta is None:
    raise FileNotFoundError(
        f'{os.path.join(directory, "encoder_config.json")} not found (config.{key}='
        f'{directory!r}): pretrain first, or point config.{key} at the encoder/ directory a '
        f'pretraining run exported')
  if method is not None and meta.get('method') not in (None, method):
    raise ValueError(f'the encoder in {directory} was pretrained as {meta["method"]!r}, not '
                     f'as this run\'s config.method {method!r}: use --config=<dataset>.py:'
                     f'{meta["method"]} (its row), or point config.{key} at a {method!r} '
                     f'encoder')
  exported = meta['model']
  diffs = model_mismatches(exported, model_cfg)
  if diffs:
    listed = ', '.join(f'model.{k}: encoder {a!r} vs config {b!r}' for k, (a, b) in diffs.items())
    raise ValueError(f'the encoder in {directory} was pretrained with a different model config '
                     f'than this run\'s config.model ({listed}); use the row it was pretrained '
                     f'as, or set those config.model values')
  return state_lib.load_encoder(directory, run_compute(model_cfg))


def run_compute(model_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """This run's RUN_COMPUTE_KEYS (those its config.model has), for state.load_encoder."""
  return {k: model_cfg[k] for k in RUN_COMPUTE_KEYS if k in model_cfg}
