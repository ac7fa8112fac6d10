"""Waymo Open Dataset (perception v1), prepared by data_prep/waymo.py. Paper S2 defaults.

  python -m lemumo_jax.main --config=configs/waymo.py:lemumo \
      --config.data.data_dir=/data/tfds/lemumo_waymo/front_320x480/1.0.0 \
      --workdir=/runs/waymo_lemumo

The argument after ':' names the paper's table row (configs/common.py METHODS).
"""

from configs import common


def get_config(arg=None):
  config = common.base_config()
  config.data.name = 'tfds'
  config.data.image_size = (320, 480)
  config.data.companion = 'depth'
  return common.apply_method(config, common.parse_arg(arg))
