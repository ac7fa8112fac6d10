"""FLIR ADAS v2, RGB + thermal, prepared by data_prep/flir.py (paired video frames).

  python -m lemumo_jax.main --config=configs/flir.py:lemumo \
      --config.data.data_dir=/data/flir_shards --workdir=runs/flir_lemumo

From scratch the paper uses the longer 20-epoch FLIR schedule (S1). The companion is the
thermal image in [0, 1]; it is resampled bilinearly (it is a dense image, unlike sparse depth).
FLIR has 2D boxes only: the probes are the 2D CenterNet head and box-footprint occupancy.
"""

from configs import common


def get_config(arg=None):
  config = common.base_config()
  config.data.update(name='arrayrecord', image_size=(512, 640), companion='thermal')
  config.views.companion_resize = 'linear'
  config.train.num_epochs = 20
  config.probe.heads = ('centernet2d', 'occupancy')
  return common.apply_method(config, common.parse_arg(arg))
