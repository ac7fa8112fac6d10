"""Defaults shared by every dataset config, and the paper's method rows.

A row of the paper's tables is a config, not a code path: `get_config('<row>')` in a dataset
file calls `apply_method` with the row name, which only sets config values. Table 5's training
regimes follow the row after a comma (`<row>,transfer`, `<row>,finetune`; REGIMES below).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

# Paper row -> the config values that define it. Each entry is applied on top of the
# dataset defaults; keys are dotted paths into the config.
# Shared fragments the rows compose.
FT_PRUNED = {'model.family': 'fusion', 'model.fusion_mode': 'pruned',
             'model.layer0_impl': 'structured'}
RGB_VIT = {'model.family': 'vit', 'model.inputs': 'rgb'}
MULTIMAE_SS = {'model.family': 'multimae', 'objective.name': 'mae', 'views.num_local': 0}

METHODS: dict[str, dict[str, object]] = {
    # Le MuMo JEPA = FT-Pruned + SIGReg on the joint CLS (the paper's default).
    'lemumo': FT_PRUNED,
    # The same model with the reference (dense, masked) layer 0; identical numerics.
    'lemumo_masked': {**FT_PRUNED, 'model.layer0_impl': 'masked'},
    # FT-Persistent + SIGReg (Table 2, Table 6).
    'ft_persistent': {**FT_PRUNED, 'model.fusion_mode': 'persistent',
                      'model.layer0_impl': 'masked'},
    # LeJEPA RGB-only (Table 1, 3).
    'lejepa_rgb': RGB_VIT,
    # LiDAR-only JEPA (Table 1, 3): the same ViT on the 1-channel companion map.
    'lidar_only': {'model.family': 'vit', 'model.inputs': 'companion'},
    # FT-Pruned + VICReg (Table 2, 6): the Le MuMo encoder, VICReg in place of the LeJEPA loss.
    'lemumo_vicreg': {**FT_PRUNED, 'objective.name': 'vicreg'},
    # FT-Pruned + SIGReg (3-pass) (Table 2, 6; eq. S3): SIGReg averaged over the joint, RGB-only
    # (companion zeroed) and companion-only (RGB zeroed) passes; invariance on the joint pass.
    'lemumo_3pass': {**FT_PRUNED, 'objective.passes': ('joint', 'rgb', 'companion')},
    # Early Fusion RGBD (Table 2, 6; S1): one ViT over stacked RGB + companion channels.
    'early_fusion': {'model.family': 'early_fusion'},
    # Late Fusion (Table 2, 6; S1): an RGB ViT and a companion ViT of model.width each (two
    # ViT-S/16), CLS and patches concatenated to 2 x width channels before the projector and
    # the probes.
    'late_fusion': {'model.family': 'late_fusion'},
    # ImageBind-style baseline (Table 3, 6; S1): an RGB ViT and a companion ViT of model.width
    # each (the 'dual' family, late_fusion's branches), trained by symmetric InfoNCE at
    # temperature 0.07 between their projected CLS embeddings of the same global view; local
    # crops disabled (S1). The probes read the camera-aligned RGB patch grid only (S3).
    'imagebind': {'model.family': 'dual', 'objective.name': 'infonce',
                  'objective.infonce_temperature': 0.07, 'views.num_local': 0},
    # DINOv3-style RGB baseline (Table 3, 6; S1): an RGB ViT trained by DINO (cross-view CLS
    # prototypes) + iBOT (masked patch prototypes) against an EMA teacher (models/dino.py,
    # objectives/dino.py; settings in config.dino), DINO lr 5e-4, AdamW betas (0.9, 0.95).
    # The exported encoder (what the probes read) is the teacher's backbone.
    'dinov3': {**RGB_VIT, 'objective.name': 'dino', 'optim.lr': 5e-4, 'optim.b1': 0.9,
               'optim.b2': 0.95},
    # MultiMAE-SS (Table 3-6; S1): masked reconstruction of the RGB and companion patches
    # (models/multimae.py, objectives/mae.py; settings in config.multimae: mask ratio 0.75,
    # decoder depth 2, width 256); local crops disabled. Probes: the RGB patch tokens (S3).
    'multimae_ss': MULTIMAE_SS,
    # MultiMAE-MT (Table 3-6; S1): the same, plus a semantic-segmentation output task on the
    # dataset's seg labels, cropped with each view (views.with_seg).
    'multimae_mt': {**MULTIMAE_SS, 'views.with_seg': True,
                    'multimae.tasks': ('rgb', 'companion', 'seg')},
}


def method_names() -> list[str]:
  return sorted(METHODS)


# Training regimes (Table 5, S1), the optional second part of the row argument:
# --config=configs/flir.py:<row>[,<regime>]. Like a row, a regime only sets config values.
#   scratch   (default) nothing: the dataset's own SSL schedule, then the frozen probes.
#   transfer  frozen probes on an encoder pretrained on another dataset (S1 "Waymo->FLIR frozen
#             transfer"): mode=probe, V = 1, no local crops; the probe schedule is base_config's
#             (5 epochs, batch 64, probe lr 1e-3, 640 x 640 views, validation every 100 steps).
#   finetune  end-to-end fine-tuning of such an encoder with a detection decoder (S1 "End-to-end
#             FLIR fine-tuning"): mode=finetune with config.finetune.
# REQUIRED marks a path the command line must give (an unset one is an error naming the key).
REQUIRED = object()
REGIMES: dict[str, dict[str, object]] = {
    'scratch': {},
    'transfer': {'mode': 'probe', 'views.num_global': 1, 'views.num_local': 0,
                 'probe.encoder_dir': REQUIRED},
    'finetune': {'mode': 'finetune', 'finetune.encoder_dir': REQUIRED},
}


def _set_values(config: ml_collections.ConfigDict, values: dict[str, object]) -> None:
  # A fresh placeholder per config: a shared FieldReference would link configs' values.
  config.update_from_flattened_dict({
      key: config_dict.placeholder(str) if value is REQUIRED else value
      for key, value in values.items()})


def apply_method(config: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
  """Applies '<row>[,<regime>]' or big_vision's 'row=<row>[,regime=<regime>]': sets
  `config.method` to the row and the row's and the regime's values; an unknown row, regime or
  key is a ValueError listing the choices."""
  row, regime = _row_and_regime(method)
  if row not in METHODS:
    raise ValueError(f'unknown method row {row!r}; choose one of {method_names()} '
                     f'(e.g. --config=configs/synthetic.py:lemumo)')
  regime = regime or 'scratch'
  if regime not in REGIMES:
    raise ValueError(f'unknown training regime {regime!r} in {method!r}; choose one of '
                     f'{list(REGIMES)} (e.g. --config=configs/flir.py:{row},transfer)')
  config.method = row
  _set_values(config, METHODS[row])
  _set_values(config, REGIMES[regime])
  return config


def _row_and_regime(method: str) -> tuple[str, str]:
  if '=' not in method:
    row, _, regime = method.partition(',')
    return row, regime
  values = {}
  for part in method.split(','):
    key, sep, value = part.partition('=')
    if not sep or key not in ('row', 'regime') or key in values:
      raise ValueError(f'config argument {method!r}: give row=<row>[,regime=<regime>] (or '
                       f'<row>[,<regime>]); {part!r} is not one of them')
    values[key] = value
  return values.get('row', 'lemumo'), values.get('regime', '')


def parse_arg(arg: str | None, default: str = 'lemumo') -> str:
  """`get_config` receives the text after ':' in --config=path:arg (None when absent)."""
  return default if arg in (None, '') else arg


def base_config() -> ml_collections.ConfigDict:
  """Paper S2 defaults (Waymo): ViT-S/16, batch 64, 2 x 224 + 8 x 96 crops, proj dim 16,
  lr 1e-4, lambda 0.1, 5 SSL epochs."""
  c = ml_collections.ConfigDict()
  # 'pretrain' | 'probe' | 'pretrain_probe' (both, in order) | 'finetune' | 'profile'
  c.mode = 'pretrain'
  c.method = 'lemumo'
  c.seed = 0

  c.data = ml_collections.ConfigDict({
      'name': 'tfds',             # 'tfds' (a dataset built by data_prep/) or 'synthetic'
      'data_dir': '',
      'image_size': (320, 480),   # frames are resized to this on the host (H, W)
      'companion': 'depth',       # 'depth' or 'thermal'
      'num_train': 0,             # synthetic only
      'num_val': 0,               # synthetic only
      'seed': 0,                  # synthetic only: which scenes
      # synthetic only: objects' distance along the road (metres), by default within the range
      # a 96 x 128 view resolves (data/synthetic.py OBJECT_RANGE, the same value, says why)
      'object_range': (4.0, 30.0),
      'num_threads': 4,           # grain read threads
      'prefetch': 4,
      'num_workers': 0,           # grain worker processes (0: threads only)
  })

  c.views = ml_collections.ConfigDict({
      'num_global': 2,
      'num_local': 8,
      'global_size': 224,
      'local_size': 96,
      'global_scale': (0.4, 1.0),
      'local_scale': (0.05, 0.4),
      'companion_resize': 'nearest',
      'photometric': True,        # ColorJitter, grayscale, blur, solarize on RGB only
      'with_seg': False,          # also crop the seg labels with each view (multimae_mt)
  })

  c.model = ml_collections.ConfigDict({
      # 'fusion' | 'vit' | 'early_fusion' | 'late_fusion' | 'dual' | 'multimae'
      'family': 'fusion',
      'inputs': 'rgb',             # 'vit' only: 'rgb' | 'companion'
      'fusion_mode': 'pruned',     # 'pruned' | 'persistent'
      'layer0_impl': 'structured', # 'structured' | 'masked' (tested equal)
      'img_size': 224,             # base grid of pos_embed / fusion tokens
      'patch_size': 16,
      'width': 384,                # ViT-S/16
      'depth': 12,
      'num_heads': 6,
      'mlp_ratio': 4.0,
      'companion_channels': 1,
      # Companion stems also read a 0/1 'has a return' channel (parts.companion_stem_input):
      # off is the paper's plain stem (benchmarks/RESULTS.md measures it on).
      'companion_valid': False,
      'dtype': 'bfloat16',         # compute dtype; params and optimizer state stay float32
      # How the blocks compute, not what (models/vit.py; may change on resume): attention
      # kernel 'auto' (cuDNN flash attention on a GPU, XLA's elsewhere) | 'xla' | 'cudnn';
      # per-block rematerialisation 'none' | 'full' | 'dots'. 'dots' keeps the paper step under
      # 6 GB at batch 64 (about half of 'none') for a few % more FLOPs; 'none' is faster
      # where memory allows (benchmarks/RESULTS.md, issue 32).
      'attention': 'auto',
      'remat': 'dots',
  })

  c.projector = ml_collections.ConfigDict({
      'hidden_dim': 2048,
      'num_hidden_layers': 2,
      'out_dim': 16,
  })

  c.objective = ml_collections.ConfigDict({
      'name': 'lejepa',            # 'lejepa' | 'vicreg' | 'infonce' (family 'dual' only)
      # encoder passes: 'joint' (+ 'rgb': companion zeroed, 'companion': RGB zeroed; S3)
      'passes': ('joint',),
      'lam': 0.1,
      # The balance of the two terms (objectives/lejepa.py, objectives/sigreg.py): the LeJEPA
      # reference code's by default. 'mean': invariance averaged over views, samples and
      # embedding dimensions (main text "mean-squared"); 'sum': summed over the dimensions
      # (S1 as printed). 'batch': SIGReg x the global batch N (reference); 'none': S2 as printed.
      'invariance_reduction': 'mean',
      'sigreg_scale': 'batch',
      'num_slices': 256,
      'num_knots': 17,
      't_max': 3.0,
      # VICReg (Bardes et al.) reference defaults: invariance, variance, covariance weights.
      'vicreg_sim': 25.0,
      'vicreg_std': 25.0,
      'vicreg_cov': 1.0,
      'vicreg_eps': 1e-4,
      # 'infonce_temperature' (0.07) exists only in the imagebind row, which sets it: a new key
      # here would change config.objective of every row and refuse resuming existing workdirs.
  })

  c.optim = ml_collections.ConfigDict({
      'lr': 1e-4,
      'weight_decay': 0.05,
      'b1': 0.9,
      'b2': 0.999,
      'warmup_fraction': 0.1,      # linear warmup over this fraction of the steps
      'final_lr_fraction': 1e-3,   # cosine decays to lr * this
      'grad_clip': 1.0,            # global-norm clip; 0 disables
  })

  c.train = ml_collections.ConfigDict({
      'batch_size': 64,            # global batch
      'num_epochs': 5,
      'num_steps': 0,              # > 0 overrides num_epochs
      'log_every': 50,
      'checkpoint_every': 500,
      'keep_checkpoints': 3,
  })

  # MultiMAE rows (model.family 'multimae', objective 'mae'; models/multimae.py): S1's mask
  # ratio and decoder size, the rest as MultiMAE's code. Its own section: keys added to
  # model/objective would refuse resuming every existing workdir.
  c.multimae = ml_collections.ConfigDict({
      'tasks': ('rgb', 'companion'),   # + 'seg' (multimae_mt): supervised output task
      'mask_ratio': 0.75,
      'mask_sampling': 'dirichlet',    # per-modality budgets ~ Dirichlet(alpha) | 'uniform'
      'dirichlet_alpha': 1.0,
      'decoder_width': 256,
      'decoder_depth': 2,              # transformer blocks after the cross-attention
      'decoder_heads': 8,
      'seg_stride': 4,                 # seg logits/labels every 4 pixels (MultiMAE's semseg)
      'num_seg_classes': 0,            # 0: the dataset metadata's seg_classes
  })

  # The dinov3 row (objective 'dino'; models/dino.py, objectives/dino.py): S1's DINO and iBOT
  # settings, the head shape DINO's. Its own section: keys added to model/objective would
  # refuse resuming every existing workdir.
  c.dino = ml_collections.ConfigDict({
      'num_prototypes': 1024,          # DINO head output (S1 "prototype dimension")
      'ibot_num_prototypes': 1024,     # iBOT head output (S1)
      'hidden_dim': 2048,              # both heads: 3-layer MLP -> L2 norm -> prototypes
      'bottleneck_dim': 256,
      'head_layers': 3,
      'student_temp': 0.1,
      'teacher_temp': 0.04,            # warm-up start 0.04, zero warm-up epochs: constant
      'teacher_momentum': 0.996,       # EMA teacher: cosine from this ...
      'final_teacher_momentum': 1.0,   # ... to this over the run (DINO's schedule)
      'centre_momentum': 0.9,          # EMA centre of the teacher logits (DINO and iBOT)
      'ibot_weight': 1.0,
      'mask_sample_probability': 0.5,  # global-view images that get iBOT masks
      'mask_ratio': (0.1, 0.5),        # masked fraction of such an image's patches ~ U(range)
  })

  # Frozen patch probes (S3): deterministic clean views, all heads trained at once.
  c.probe = ml_collections.ConfigDict({
      # 'pretrained' | 'random' (Table 1 "encoder frozen" rows) | 'raw' (no encoder: the probes
      # read the view's pixels cut into the patch grid, the no-representation reference)
      'encoder': 'pretrained',
      'encoder_dir': '',           # default: <workdir>/encoder
      'image_size': (640, 640),    # clean probe view (H, W)
      'seg_size': (224, 224),      # the segmentation probe's output resolution
      'heads': ('centernet3d', 'seg', 'depth', 'occupancy'),
      'batch_size': 64,
      'num_epochs': 5,
      'num_steps': 0,              # > 0 overrides num_epochs
      'lr': 1e-3,
      'weight_decay': 1e-4,
      'warmup_fraction': 0.05,
      'val_every': 100,            # validate every N steps; the best by val loss is kept
      'log_every': 50,
      'checkpoint_every': 500,
      'max_objects': 128,          # CenterNet regression slots per frame
      'max_gt_boxes': 256,         # evaluation boxes per frame (more is an error)
      'score_threshold': 0.05,     # detections below are dropped before AP
      'max_detections': 100,
      'centernet_hidden': 256,
      'occupancy_hidden': 64,
      'num_figure_frames': 4,
      # Compute the frozen patch grids of the train and val splits once and keep them, with the
      # targets, in host memory (training.probe.FeatureCache): a probe step is then the heads
      # alone, with the same frames at every step. Off at the paper's size (a 40 x 40 x 384
      # grid per 640 x 640 view is far over the limit for a full split); an over-limit cache
      # is an error naming its size.
      'cache_features': False,
      'cache_max_gib': 16.0,       # per host
      # After the best heads are restored, one more val pass per condition with the companion
      # perturbed (evaluation/robustness.py: zeroed, shifted right k px, a fraction of the LiDAR
      # returns dropped); extra rows of the report, nothing retrained. () disables.
      'robustness': ('companion_missing', 'shift_2px', 'shift_4px', 'shift_8px', 'drop_50',
                     'drop_90'),
  })

  # End-to-end fine-tuning (mode=finetune; S1 "End-to-end FLIR fine-tuning"): an exported
  # encoder and a detection decoder trained together on random-resized crops, validated on the
  # clean probe view (probe.image_size, probe.max_objects, ...) with the probe stage's targets,
  # metrics and report.
  c.finetune = ml_collections.ConfigDict({
      'encoder_dir': '',           # the exported encoder to fine-tune; default: <workdir>/encoder
      'heads': ('centernet2d',),   # probe heads read through the decoder (S1: 2D CenterNet)
      'decoder_layers': 3,         # 3x3 Conv+BN+ReLU layers; the last is the CenterNet adapter
      'decoder_hidden': 512,
      'batch_size': 64,
      'num_epochs': 30,
      'num_steps': 0,              # > 0 overrides num_epochs
      'encoder_lr': 2e-5,
      'head_lr': 2e-4,             # decoder and heads
      'weight_decay': 0.05,        # AdamW, both groups (kernels only, like pretraining)
      'warmup_fraction': 0.05,     # linear warmup over this fraction of the steps,
      'warmup_init_fraction': 0.01,  # from this fraction of each group's lr,
      'end_lr': 1e-7,              # then cosine decay to this
      'grad_clip': 0.0,            # global-norm clip; 0 disables (S1 names none)
      'crop_scale': (0.8, 1.0),    # random-resized-crop area fraction, train only
      'crop_ratio': (3 / 4, 4 / 3),  # its aspect range (torchvision's default)
      'val_every': 100,
      'patience': 8,               # early stop after this many validations without a new best
      'select_by': 'loss',         # best validation: 'loss' (lowest) or 'mAP50' (highest)
      'log_every': 50,
      'checkpoint_every': 500,
  })

  # mode=profile (lemumo_jax/profiling.py): Table 6's compute profile of THE train step.
  c.profile = ml_collections.ConfigDict({
      'warmup_steps': 3,           # untimed steps after compilation
      'timed_steps': 10,           # the step time is their median
      'num_records': 0,            # train records per epoch for the schedule; 0: the dataset's
  })

  # mode=analyze (lemumo_jax/training/analyze.py): Figure 3 (section 4.6), t-SNE of the frozen
  # encoder's final-layer patch embeddings (probe.encoder_dir) on the val split's probe views,
  # scored by 10-NN class purity and a planar depth fit; beside a reference row's encoder.
  c.analyze = ml_collections.ConfigDict({
      'reference_dir': '',         # another row's exported encoder/ (e.g. lejepa_rgb); '' none
      'num_points': 2000,          # patches sampled (uniformly, fixed seed) for the t-SNE
      'seed': 0,                   # the patch sample, the t-SNE and the label permutations
      'perplexity': 30.0,
      'max_iter': 1000,            # t-SNE iterations (sklearn's default)
      'max_frames': 0,             # read the first N val frames only; 0: the whole split
      'label': '',                 # column titles; '': '<paper row name> <token kind>'
      'reference_label': '',
  })
  return c
