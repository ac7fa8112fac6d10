"""FLIR ADAS v2, RGB + thermal, prepared by data_prep/flir.py (paired video frames).

Table 5's three training regimes are the row argument's optional second part
(configs/common.py REGIMES):

  # Scratch: SSL on FLIR with the longer 20-epoch FLIR schedule (S1), then the frozen probes
  python -m lemumo_jax.main --config=configs/flir.py:lemumo --config.mode=pretrain_probe \
      --config.data.data_dir=/data/tfds/lemumo_flir/video_512x640/1.0.0 --workdir=runs/flir_lemumo
  # Waymo -> FLIR frozen transfer: probes only (5 epochs, batch 64, lr 1e-3, 640 x 640, V = 1,
  # no local crops) on the frozen encoder a Waymo run exported
  python -m lemumo_jax.main --config=configs/flir.py:lemumo,transfer \
      --config.probe.encoder_dir=runs/waymo_lemumo/encoder \
      --config.data.data_dir=/data/tfds/lemumo_flir/video_512x640/1.0.0 \
      --workdir=runs/flir_lemumo_transfer
  # Fine-tune: that encoder + a 3-layer, 512-wide CenterNet decoder end to end (30 epochs,
  # encoder lr 2e-5, decoder lr 2e-4; config.finetune)
  python -m lemumo_jax.main --config=configs/flir.py:lemumo,finetune \
      --config.finetune.encoder_dir=runs/waymo_lemumo/encoder \
      --config.data.data_dir=/data/tfds/lemumo_flir/video_512x640/1.0.0 \
      --workdir=runs/flir_lemumo_finetune

The Waymo encoder transfers as is: its companion (depth) and FLIR's (thermal) are both one
channel. The companion is the thermal image in [0, 1]; the SSL views resample it bilinearly
(a dense image, unlike sparse depth). FLIR has 2D boxes only: the probes are the 2D CenterNet
head and box-footprint occupancy, and fine-tuning trains the 2D CenterNet path.
"""

from configs import common


def get_config(arg=None):
  config = common.base_config()
  config.data.update(name='tfds', image_size=(512, 640), companion='thermal')
  config.views.companion_resize = 'linear'
  config.train.num_epochs = 20
  config.probe.heads = ('centernet2d', 'occupancy')
  return common.apply_method(config, common.parse_arg(arg))
