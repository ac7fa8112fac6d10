"""Raw dataset -> ArrayRecord shards in the lemumo_jax record schema (DESIGN.md section 4).

  python -m data_prep.waymo     Waymo Open Dataset perception v1 TFRecords
  python -m data_prep.nuscenes  nuScenes through nuscenes-devkit
  python -m data_prep.flir      FLIR ADAS v2 RGB-thermal pairs

common.py holds the sharded, resumable driver and the metadata.json they write; depth.py
the image-grid and depth-rendering helpers. This package imports only
lemumo_jax.data.schema and lemumo_jax.data.geometry from the library.
"""
