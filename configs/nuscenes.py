"""nuScenes from scratch (Table 4), prepared by data_prep/nuscenes.py (CAM_FRONT + LIDAR_TOP).

  python -m lemumo_jax.main --config=configs/nuscenes.py:lemumo \
      --config.data.data_dir=/data/tfds/lemumo_nuscenes/front_288x512/1.0.0 \
      --workdir=runs/nuscenes_lemumo

Same schedule as Waymo (S1: 5 SSL epochs, then 5 probe epochs at batch 64). Frames are stored
at 288 x 512 (16:9, nothing cropped).
"""

from configs import common


def get_config(arg=None):
  config = common.base_config()
  config.data.update(name='tfds', image_size=(288, 512), companion='depth')
  return common.apply_method(config, common.parse_arg(arg))
