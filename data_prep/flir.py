"""Teledyne FLIR ADAS v2 (RGB + thermal) as a TFDS dataset.

Layout (the release's README.txt): each folder images_{rgb,thermal}_{train,val} and
video_{rgb,thermal}_test holds data/ (8-bit JPEGs: the post-processed thermal, or RGB),
coco.json (filtered annotations, recommended for training) and index.json (the raw
annotations in Teledyne's Conservator format); the thermal folders also hold analyticsData/,
the 16-bit raw thermal frames as TIFFs named like their data/ JPEG
(video-<id>-frame-<n>-<hash>.tiff).

Pairing. The release pairs RGB and thermal frames only in its video set: the root file
rgb_to_thermal_vid_map.json maps each RGB frame of video_rgb_test/data/ to its time-synced
thermal frame in video_thermal_test/data/ (3,749 pairs at 30 FPS). The images_{rgb,thermal}_
{train,val} folders were sampled independently per spectrum (the README: "sampled from
completely independent video sequences", with per-video frame skips; no public description of
the release documents a key in coco.json or index.json linking the two spectra), so they are
not paired here. The builder options pair_map, rgb_folder and thermal_folder take any other
pairing file of the same form ({rgb file name: thermal file name}, both under <folder>/data/).
Thermal source (builder option thermal_bits): 16 (default) reads the raw frame
<thermal_folder>/analyticsData/<stem>.tiff of each pair; 8 reads the data/ JPEG the pair map
names. With 16, a TIFF that holds 8-bit data (the video set has some) is used as 8-bit, and a
missing TIFF is replaced by its data/ JPEG: each such fallback is logged and listed by file in
metadata.json (fallbacks_<split>); a thermal folder without analyticsData/ stops the build.
Splits. A video (thermal video id from the file name video-<id>-frame-<n>-<hash>.jpg) goes to
val when crc32(id) % 100 < val_percent (default 20), otherwise to train, so whole videos stay
on one side and adjacent frames never straddle the split.

Shared grid. The cameras are treated as co-located and co-axial (the rig's 1.9 inch baseline,
i.e. a few pixels of parallax at 10 m, is ignored; the release ships no calibration). From
their fields of view (thermal Tau 2: thermal_hfov_deg 45, thermal_vfov_deg 37; RGB
BlackFly: rgb_hfov_deg 52.8 with square pixels) each image is centre-cropped to the view both
cameras see, narrowed to the stored aspect ratio, and resized to [H, W] (default 512 x 640,
the thermal resolution). intrinsics = the pinhole K of that shared view.

Per pair:
  rgb           the RGB frame on the shared grid
  companion     the thermal frame on the shared grid, normalised to [0, 1]: 8-bit / 255;
                16-bit (raw, analyticsData/) linearly between its 1st and 99th percentiles,
                clipped
  boxes2d       thermal coco.json boxes ([x, y, w, h] in thermal pixels) on the shared grid,
                clipped, kept when at least min_box_size pixels wide and high; categories
                matched by name against the option classes (= classes_2d), others dropped
  depth_target  zeros; seg all 255; boxes3d empty (FLIR has no 3D labels or segmentation)
  meta          scene = thermal video id, frame = its frame number (also the timestamp: the
                release has no capture times)
Work unit = one pair; a pair whose image is missing or undecodable is skipped and reported.

  python -m data_prep.build flir --manual_dir=/data/FLIR_ADAS_v2 --data_dir=/data/tfds
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import re
import zlib
from collections.abc import Iterator, Sequence

import numpy as np
from absl import logging
from pycocotools.coco import COCO

from data_prep import builder
from data_prep import depth
from lemumo_jax import files
from lemumo_jax.data import schema

FLIR_CLASSES = ('person', 'bike', 'car', 'motor', 'bus', 'train', 'truck', 'light', 'hydrant',
                'sign', 'dog', 'deer', 'skateboard', 'stroller', 'scooter', 'other vehicle')
_FRAME_NAME = re.compile(r'^video-(?P<video>[^-]+)-frame-(?P<frame>\d+)-')
ANALYTICS_FOLDER = 'analyticsData'  # the release's 16-bit raw thermal frames


@dataclasses.dataclass(frozen=True)
class Options:
  rgb_folder: str = 'video_rgb_test'
  thermal_folder: str = 'video_thermal_test'
  pair_map: str = 'rgb_to_thermal_vid_map.json'
  val_percent: int = 20
  rgb_hfov_deg: float = 52.8
  thermal_hfov_deg: float = 45.0
  thermal_vfov_deg: float = 37.0
  min_box_size: float = 1.0
  classes: tuple[str, ...] = ()  # coco.json category names kept, in classes_2d order
  thermal_bits: int = 16  # 16: analyticsData/<stem>.tiff (raw); 8: the data/ JPEG

  def __post_init__(self):  # from JSON (builder options), lists become tuples
    object.__setattr__(self, 'classes', tuple(self.classes or FLIR_CLASSES))
    if self.thermal_bits not in (8, 16):
      raise ValueError(f'builder option thermal_bits={self.thermal_bits!r}: 16 reads the raw '
                       f'frames under <thermal_folder>/{ANALYTICS_FOLDER}/, 8 the JPEGs under '
                       'data/')


@dataclasses.dataclass(frozen=True)
class Pair:
  rgb_path: str
  thermal_path: str  # the file read: the analyticsData/ TIFF, or the data/ JPEG (8-bit)
  thermal_jpeg: str  # the data/ JPEG the pair map names: coco.json's key and the fallback
  video: str
  frame: int


def video_and_frame(file_name: str) -> tuple[str, int]:
  """('<id>', n) from FLIR's video-<id>-frame-<n>-<hash>.jpg; (stem, 0) for other names."""
  match = _FRAME_NAME.match(os.path.basename(file_name))
  if match is None:
    return os.path.splitext(os.path.basename(file_name))[0], 0
  return match['video'], int(match['frame'])


def is_val_video(video: str, val_percent: int) -> bool:
  return zlib.crc32(video.encode()) % 100 < val_percent


def shared_view(rgb_hw: tuple[int, int], thermal_hw: tuple[int, int], out_hw: tuple[int, int],
                options: Options) -> tuple[depth.GridTransform, depth.GridTransform, np.ndarray]:
  """Grid transforms of both images onto the view both cameras see, and its [3, 3] K."""
  height, width = out_hw
  rgb_tx = math.tan(math.radians(options.rgb_hfov_deg) / 2)
  rgb_ty = rgb_tx * rgb_hw[0] / rgb_hw[1]
  thermal_tx = math.tan(math.radians(options.thermal_hfov_deg) / 2)
  thermal_ty = math.tan(math.radians(options.thermal_vfov_deg) / 2)
  # Half-angle tangents of the shared view, narrowed to the stored aspect (square pixels).
  tx, ty = min(rgb_tx, thermal_tx), min(rgb_ty, thermal_ty)
  if tx / ty > width / height:
    tx = ty * width / height
  else:
    ty = tx * height / width

  def grid(hw, cam_tx, cam_ty):
    crop_w, crop_h = hw[1] * tx / cam_tx, hw[0] * ty / cam_ty
    return depth.GridTransform(hw[0], hw[1], height, width, (hw[1] - crop_w) / 2,
                               (hw[0] - crop_h) / 2, crop_w, crop_h)

  intrinsics = np.array([[width / (2 * tx), 0, width / 2], [0, height / (2 * ty), height / 2],
                         [0, 0, 1]], np.float64)
  return grid(rgb_hw, rgb_tx, rgb_ty), grid(thermal_hw, thermal_tx, thermal_ty), intrinsics


def normalize_thermal(image: np.ndarray) -> np.ndarray:
  """[h, w] or [h, w, c] 8/16-bit thermal -> [h, w] float32 in [0, 1]."""
  eight_bit = image.dtype == np.uint8
  image = np.asarray(image, np.float64)
  if image.ndim == 3:
    image = image.mean(-1)  # 8-bit thermal JPEGs may be stored as 3 equal channels
  if eight_bit:
    return (image / 255.0).astype(np.float32)
  low, high = np.percentile(image, [1, 99])
  return np.clip((image - low) / max(high - low, 1e-6), 0.0, 1.0).astype(np.float32)


def _load(path: str, mode: str | None) -> np.ndarray:
  return builder.read_image(path, mode)


class ThermalBoxes:
  """The thermal coco.json (via pycocotools), indexed by image file name."""

  def __init__(self, coco_path: str, classes: Sequence[str]):
    self.path = coco_path
    payload = files.read_json(coco_path, 'restore it from the FLIR ADAS v2 release')
    if payload is None:
      raise ValueError(f'{coco_path} not found: the thermal boxes are read from it')
    if not isinstance(payload, dict) or not isinstance(payload.get('images'), list):
      raise ValueError(f'{coco_path}: not a COCO annotation file (no "images" list)')
    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints its indexing progress
      self.coco = COCO()
      self.coco.dataset = payload
      self.coco.createIndex()
    names = {c['id']: c['name'] for c in self.coco.loadCats(self.coco.getCatIds())}
    missing = sorted(set(classes) - set(names.values()))
    if missing:
      logging.warning('%s has no categories %s; they get no boxes', coco_path, missing)
    self.class_of = {cat_id: classes.index(name) for cat_id, name in names.items()
                     if name in classes}
    self.image_ids = {os.path.basename(image['file_name']): image_id
                      for image_id, image in self.coco.imgs.items()}

  def boxes(self, file_name: str, report: builder.Report) -> tuple[np.ndarray, np.ndarray]:
    """([M, 4] x1, y1, x2, y2 thermal pixels, [M] classes_2d index) of one image. An annotation
    whose bbox is missing, not 4 finite numbers or of negative size is reported (coco.json,
    its id, the field) and left out."""
    image_id = self.image_ids.get(os.path.basename(file_name))
    annotations = self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id])) if (
        image_id is not None) else []
    boxes, classes = [], []
    for a in annotations:
      if a.get('category_id') not in self.class_of:
        continue
      where = f'{self.path} annotation id {a.get("id")!r}'
      values = builder.finite_values(a, ('bbox',), (4,), where, report)
      if values is None:
        continue
      x, y, w, h = values[0]
      if w < 0 or h < 0:
        report.bad_label(where, f'bbox {a["bbox"]!r} has a negative width or height')
        continue
      boxes.append([x, y, x + w, y + h])
      classes.append(self.class_of[a['category_id']])
    return np.array(boxes, np.float64).reshape(-1, 4), np.array(classes, np.int32)


def load_thermal(pair: Pair, report: builder.Report) -> np.ndarray:
  """The pair's thermal image as stored ([h, w] or [h, w, c], uint8 or uint16); an 8-bit TIFF
  or a missing one (replaced by the data/ JPEG) where the raw frame was asked is reported as a
  fallback."""
  if pair.thermal_path == pair.thermal_jpeg:
    return _load(pair.thermal_jpeg, None)
  if not os.path.exists(pair.thermal_path):
    report.fallback(pair.thermal_path, 'no 16-bit raw frame; read the 8-bit data/'
                    f'{os.path.basename(pair.thermal_jpeg)} instead')
    return _load(pair.thermal_jpeg, None)
  image = _load(pair.thermal_path, None)
  if image.dtype == np.uint8:
    report.fallback(pair.thermal_path, 'holds 8-bit data where the 16-bit raw frame was asked '
                    'for; normalised as 8-bit (/ 255)')
  return image


def pair_frame(pair: Pair, thermal_boxes: ThermalBoxes, options: Options,
               config: builder.Config, report: builder.Report) -> Iterator[builder.Frame]:
  """The record of one RGB-thermal pair (a work unit); a broken pair raises."""
  rgb = _load(pair.rgb_path, 'RGB')
  thermal = normalize_thermal(load_thermal(pair, report))
  height, width = config.image_height, config.image_width
  rgb_grid, thermal_grid, intrinsics = shared_view(rgb.shape[:2], thermal.shape[:2],
                                                   (height, width), options)
  boxes, classes = thermal_boxes.boxes(pair.thermal_jpeg, report)
  boxes2d, keep = thermal_grid.boxes(boxes, options.min_box_size)
  record = {
      'rgb': rgb_grid.rgb(rgb),
      'companion': np.clip(thermal_grid.scalar(thermal), 0.0, 1.0),
      'depth_target': np.zeros((height, width), np.float32),
      'seg': np.full((height, width), schema.IGNORE_LABEL, np.uint8),
      **schema.empty_boxes(),
      'boxes2d': boxes2d[keep],
      'boxes2d_cls': classes[keep],
      'intrinsics': intrinsics.astype(np.float32),
      'meta': {'dataset': 'flir', 'scene': pair.video, 'frame': pair.frame,
               'camera': 'rgb+thermal', 'timestamp': pair.frame},
  }
  yield record, None


def split_units(manual_dir: str, config: builder.Config) -> dict[str, list[builder.WorkUnit]]:
  """{'train': pairs of train videos, 'val': pairs of val videos} (empty splits left out)."""
  options = Options(**config.options)
  map_path = os.path.join(manual_dir, options.pair_map)
  if not os.path.exists(map_path):
    raise FileNotFoundError(f'{map_path} not found: the option pair_map names the RGB -> '
                            'thermal frame map under manual_dir')
  pair_map = files.read_json(map_path, 'restore it from the FLIR ADAS v2 release')
  if not isinstance(pair_map, dict) or not all(
      isinstance(k, str) and isinstance(v, str) for k, v in pair_map.items()):
    raise ValueError(f'{map_path}: not a map of RGB to thermal frame names (a JSON object of '
                     'strings)')
  thermal_dir = os.path.join(manual_dir, options.thermal_folder)
  if options.thermal_bits == 16 and not os.path.isdir(os.path.join(thermal_dir,
                                                                   ANALYTICS_FOLDER)):
    raise FileNotFoundError(
        f'{os.path.join(thermal_dir, ANALYTICS_FOLDER)} not found: the 16-bit raw thermal '
        'frames (builder option thermal_bits=16, the default) are read from there; pass '
        '--options=\'{"thermal_bits": 8}\' to build from the 8-bit data/ JPEGs')
  coco_path = os.path.join(thermal_dir, 'coco.json')  # the boxes (Converter's ThermalBoxes)
  units: dict[str, list[builder.WorkUnit]] = {'train': [], 'val': []}
  for rgb_name, thermal_name in pair_map.items():
    video, frame = video_and_frame(thermal_name)
    thermal_jpeg = os.path.join(thermal_dir, 'data', os.path.basename(thermal_name))
    thermal_path = thermal_jpeg if options.thermal_bits == 8 else os.path.join(
        thermal_dir, ANALYTICS_FOLDER, os.path.splitext(os.path.basename(thermal_name))[0]
        + '.tiff')
    pair = Pair(os.path.join(manual_dir, options.rgb_folder, 'data', os.path.basename(rgb_name)),
                thermal_path, thermal_jpeg, video, frame)
    split = 'val' if is_val_video(video, options.val_percent) else 'train'
    inputs = (pair.rgb_path, pair.thermal_path, thermal_jpeg, map_path, coco_path)
    units[split].append(builder.WorkUnit(os.path.basename(rgb_name), pair,
                                         tuple(dict.fromkeys(inputs))))
  units = {split: u for split, u in units.items() if u}
  if not units:
    raise ValueError(f'{map_path} lists no pairs')
  return units


class Converter:
  def __init__(self, manual_dir: str, config: builder.Config):
    self.options = Options(**config.options)
    self.config = config
    self.thermal_boxes = ThermalBoxes(
        os.path.join(manual_dir, self.options.thermal_folder, 'coco.json'), self.options.classes)

  def convert(self, pair: Pair, report: builder.Report) -> Iterator[builder.Frame]:
    """A broken pair is dropped whole, by raising; a thermal fallback goes to `report`."""
    return pair_frame(pair, self.thermal_boxes, self.options, self.config, report)


class LemumoFlir(builder.RecordBuilder):
  """FLIR ADAS v2: manual_dir = FLIR_ADAS_v2 (rgb_to_thermal_vid_map.json, video_*_test/ with
  data/ and, for the thermal folder, analyticsData/)."""

  DATASET = 'flir'
  COMPANION = 'thermal'
  CLASSES_2D = FLIR_CLASSES
  BUILDER_CONFIGS = [
      builder.Config(name='video_512x640', image_height=512, image_width=640,
                     options=dataclasses.asdict(Options()),
                     description='RGB-thermal video pairs on the shared 512 x 640 grid'),
  ]
  split_units = staticmethod(split_units)
  make_converter = staticmethod(Converter)
