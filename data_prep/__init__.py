"""Raw dataset -> TFDS datasets (array_record) in the lemumo_jax record schema (DESIGN.md 4).

  python -m data_prep.build waymo|nuscenes|flir --manual_dir=RAW --data_dir=OUT

builder.py holds the TFDS builder base and its Beam pipeline; waymo.py, nuscenes.py and
flir.py the per-frame conversion of each dataset and its builder configs; depth.py the
image-grid and depth-rendering helpers. This package imports only lemumo_jax.data.schema and
lemumo_jax.data.geometry from the library.
"""
