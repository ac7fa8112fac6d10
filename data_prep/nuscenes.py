"""nuScenes (read through nuscenes-devkit) as a TFDS dataset.

Input: manual_dir = the devkit's dataroot (<version>/*.json tables, samples/, maps/ and, if
installed, lidarseg/<version>/*.bin). Only keyframes (the 2 Hz annotated samples) are used.

Per sample and camera (builder option cameras, default CAM_FRONT):
  rgb           the camera JPEG, centre-cropped to the stored aspect ratio and resized
                (default 288 x 512 keeps nuScenes' 16:9 without cropping)
  companion     LIDAR_TOP keyframe sweep projected into the camera through the ego poses at
                both sensors' timestamps: lidar -> ego(t_lidar) -> global -> ego(t_cam) ->
                camera; points nearer than min_depth (1 m, the devkit's own choice, drops
                returns from the ego vehicle) removed; nearest point wins; depth / 80 m
  depth_target  the same map in metres
  seg           lidarseg point labels projected the same way (sparse: 255 where no point),
                mapped to the 16 classes of the nuScenes-lidarseg challenge
                (devkit LidarsegClassMapper; its 'ignore' -> 255), class index = challenge
                index - 1; all 255 when the dataroot has no lidarseg
  boxes3d       sample annotations in the camera frame (yaw about camera y): the devkit's
                detection mapping gives car and pedestrian (adult, child, police officer,
                construction worker); vehicle.bicycle with attribute cycle.with_rider ->
                cyclist (bicycles without a rider are dropped, like every other class);
                kept when the whole box is in front of the camera and overlaps the image
                (both tested on the annotation's true 8 corners, below)
  boxes2d       the bounds of each annotation's true 8 corners (Box.corners(), its full
                quaternion through the ego pose and camera extrinsic, so its pitch and roll
                relative to the camera count) projected and clipped to the image, as
                geometry.corners_to_2d does for Waymo (classes_2d = CLASSES_3D)
  intrinsics    the calibrated camera_intrinsic, scaled to the stored grid
Work unit = one scene; a sample whose LiDAR, label or image file is missing or corrupt is
skipped and reported by file name (data_prep/builder.py).

Splits (builder options version, splits): the devkit's scene splits, train = 'train' and
val = 'val' of v1.0-trainval (config front_288x512), or 'mini_train' / 'mini_val' of
v1.0-mini (config mini_front_288x512).
  python -m data_prep.build nuscenes --manual_dir=/data/nuscenes --data_dir=/data/tfds
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import io
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from nuscenes.eval.detection.utils import category_to_detection_name
from nuscenes.eval.lidarseg.utils import LidarsegClassMapper
from nuscenes.nuscenes import NuScenes
from nuscenes.utils.data_classes import LidarPointCloud
from nuscenes.utils.geometry_utils import transform_matrix
from nuscenes.utils.splits import create_splits_scenes
from pyquaternion import Quaternion

from data_prep import builder
from data_prep import depth
from lemumo_jax import files
from lemumo_jax.data import geometry
from lemumo_jax.data import schema

# nuScenes-lidarseg challenge classes by index 1..16 (0 = ignore), the devkit's coarse map.
SEG_CLASSES = ('barrier', 'bicycle', 'bus', 'car', 'construction_vehicle', 'motorcycle',
               'pedestrian', 'traffic_cone', 'trailer', 'truck', 'driveable_surface',
               'other_flat', 'sidewalk', 'terrain', 'manmade', 'vegetation')
CYCLIST_ATTRIBUTE = 'cycle.with_rider'


@dataclasses.dataclass(frozen=True)
class Options:
  version: str = 'v1.0-trainval'
  splits: tuple[tuple[str, str], ...] = (('train', 'train'), ('val', 'val'))
  cameras: tuple[str, ...] = ('CAM_FRONT',)
  min_depth: float = 1.0

  def __post_init__(self):  # from JSON (builder options), lists become tuples
    object.__setattr__(self, 'cameras', tuple(self.cameras))
    object.__setattr__(self, 'splits', tuple(tuple(s) for s in self.splits))


def box_class(category_name: str, attribute_names: Sequence[str]) -> int | None:
  """CLASSES_3D index of an annotation, or None for classes we drop."""
  name = category_to_detection_name(category_name)
  if name in ('car', 'pedestrian'):
    return schema.CLASSES_3D.index(name)
  if name == 'bicycle' and CYCLIST_ATTRIBUTE in attribute_names:
    return schema.CLASSES_3D.index('cyclist')
  return None


def _pose(record: dict[str, Any], inverse: bool = False) -> np.ndarray:
  """[4, 4] of a calibrated_sensor / ego_pose record (sensor -> ego, ego -> global)."""
  return transform_matrix(record['translation'], Quaternion(record['rotation']), inverse=inverse)


def camera_from_global(nusc, camera_sd: dict[str, Any]) -> np.ndarray:
  calibration = nusc.get('calibrated_sensor', camera_sd['calibrated_sensor_token'])
  ego = nusc.get('ego_pose', camera_sd['ego_pose_token'])
  return _pose(calibration, inverse=True) @ _pose(ego, inverse=True)


def global_from_sensor(nusc, sd: dict[str, Any]) -> np.ndarray:
  calibration = nusc.get('calibrated_sensor', sd['calibrated_sensor_token'])
  return _pose(nusc.get('ego_pose', sd['ego_pose_token'])) @ _pose(calibration)


def annotation_boxes(nusc, sample: dict[str, Any], cam_from_global: np.ndarray,
                     report: builder.Report) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Schema boxes [K, 7] in the camera frame, their true corners [K, 8, 3] in the camera frame
  (the annotation's full rotation: the 2D boxes and the keep test use these, since the schema
  box keeps only the yaw about the camera's y axis) and CLASSES_3D indices [K] of a sample. An
  annotation with a missing or non-finite translation, size or rotation (or a zero quaternion)
  is reported, naming sample_annotation.json, its token and the field, and left out."""
  table = os.path.join(nusc.dataroot, nusc.version, 'sample_annotation.json')
  boxes, corners, classes = [], [], []
  for token in sample['anns']:
    annotation = nusc.get('sample_annotation', token)
    attributes = [nusc.get('attribute', t)['name'] for t in annotation['attribute_tokens']]
    cls = box_class(annotation['category_name'], attributes)
    if cls is None:
      continue
    where = f'{table} token {token}'
    values = builder.finite_values(annotation, ('translation', 'size', 'rotation'), (3, 3, 4),
                                   where, report)
    if values is None:
      continue
    if not np.any(values[2]):
      report.bad_label(where, f'rotation {annotation["rotation"]!r} is a zero quaternion')
      continue
    box = nusc.get_box(token)  # global frame; wlh = width, length, height
    center = geometry.transform_points(cam_from_global, box.center[None])[0]
    length_axis = cam_from_global[:3, :3] @ box.rotation_matrix[:, 0]
    yaw = np.arctan2(-length_axis[2], length_axis[0])
    width, length, height = box.wlh
    boxes.append([*center, length, width, height, yaw])
    corners.append(geometry.transform_points(cam_from_global, box.corners().T))
    classes.append(cls)
  return (np.asarray(boxes, np.float64).reshape(-1, 7),
          np.asarray(corners, np.float64).reshape(-1, 8, 3), np.asarray(classes, np.int32))


def load_points(path: str) -> np.ndarray:
  """[P, 3] points of a .pcd.bin file (x, y, z, intensity, ring as float32)."""
  try:
    return LidarPointCloud.from_file(path).points[:3].T.astype(np.float64)
  except (OSError, ValueError) as e:
    raise builder.CorruptInputError(path, f'{type(e).__name__}: {e}') from e


def load_lidarseg(path: str, num_points: int, fine_to_seg: np.ndarray) -> np.ndarray:
  """[P] uint8 stored class per point from a lidarseg .bin (one uint8 fine label each)."""
  try:
    fine = np.fromfile(path, dtype=np.uint8)
  except OSError as e:
    raise builder.CorruptInputError(path, f'{type(e).__name__}: {e}') from e
  if fine.size != num_points:
    raise builder.CorruptInputError(path, f'{fine.size} labels for {num_points} points')
  return fine_to_seg[fine]


def fine_to_seg_table(nusc) -> np.ndarray:
  """[256] uint8 lookup: lidarseg fine index -> stored class (challenge index - 1, 255)."""
  with contextlib.redirect_stdout(io.StringIO()):
    mapper = LidarsegClassMapper(nusc)
  coarse_names = {i: n for n, i in mapper.coarse_name_2_coarse_idx_mapping.items()}
  assert tuple(coarse_names[i] for i in range(1, len(SEG_CLASSES) + 1)) == SEG_CLASSES
  table = np.full(256, schema.IGNORE_LABEL, np.uint8)
  for fine, coarse in mapper.fine_idx_2_coarse_idx_mapping.items():
    if coarse != mapper.ignore_class['index']:
      table[fine] = coarse - 1
  return table


def _load_image(path: str) -> np.ndarray:
  return builder.read_image(path, 'RGB')


def sample_frame(nusc, sample: dict[str, Any], index: int, camera: str, scene_name: str,
                 lidarseg_files: dict[str, str], fine_to_seg: np.ndarray | None,
                 options: Options, config: builder.Config,
                 report: builder.Report) -> builder.Frame:
  missing = {'LIDAR_TOP', camera} - set(sample['data'])
  if missing:
    raise builder.CorruptInputError(f'sample {sample["token"]}', f'no keyframe of {missing}')
  lidar_sd = nusc.get('sample_data', sample['data']['LIDAR_TOP'])
  camera_sd = nusc.get('sample_data', sample['data'][camera])
  camera_path = os.path.join(nusc.dataroot, camera_sd['filename'])
  rgb = _load_image(camera_path)
  height, width = config.image_height, config.image_width
  grid = depth.GridTransform.center_crop(rgb.shape[0], rgb.shape[1], height, width)
  calibration = nusc.get('calibrated_sensor', camera_sd['calibrated_sensor_token'])
  intrinsics = grid.intrinsics(depth.opencv_to_grid_intrinsics(calibration['camera_intrinsic']))

  lidar_path = os.path.join(nusc.dataroot, lidar_sd['filename'])
  points = load_points(lidar_path)
  cam_from_global = camera_from_global(nusc, camera_sd)
  points_cam = geometry.transform_points(cam_from_global @ global_from_sensor(nusc, lidar_sd),
                                         points)
  near = points_cam[:, 2] >= options.min_depth
  companion, depth_m = geometry.render_depth(points_cam[near], intrinsics, height, width)
  if fine_to_seg is not None and lidar_sd['token'] in lidarseg_files:
    labels = load_lidarseg(os.path.join(nusc.dataroot, lidarseg_files[lidar_sd['token']]),
                           len(points), fine_to_seg)
    uv, z = geometry.project_points(points_cam[near], intrinsics)
    seg = depth.render_labels(uv, z, labels[near], height, width)
  else:
    seg = np.full((height, width), schema.IGNORE_LABEL, np.uint8)

  boxes3d, corners, classes = annotation_boxes(nusc, sample, cam_from_global, report)
  boxes2d, keep = geometry.corners_to_2d(corners, intrinsics, height, width)
  record = {
      'rgb': grid.rgb(rgb),
      'companion': companion,
      'depth_target': depth_m,
      'seg': seg,
      'boxes3d': boxes3d[keep].astype(np.float32),
      'boxes3d_cls': classes[keep],
      'boxes2d': boxes2d[keep],
      'boxes2d_cls': classes[keep],
      'intrinsics': intrinsics.astype(np.float32),
      'meta': {'dataset': 'nuscenes', 'scene': scene_name, 'frame': index, 'camera': camera,
               'timestamp': int(camera_sd['timestamp'])},
  }
  source_jpeg = None
  if grid.is_identity and camera_path.lower().endswith(('.jpg', '.jpeg')):
    with open(camera_path, 'rb') as f:
      source_jpeg = f.read()
  return record, source_jpeg


def convert_scene(scene_token: str, skip: builder.Report, nusc, lidarseg_files, fine_to_seg,
                  options: Options, config: builder.Config) -> Iterator[builder.Frame]:
  """Keyframes of one scene (a work unit); corrupt samples are skipped one by one."""
  scene = nusc.get('scene', scene_token)
  token, index = scene['first_sample_token'], 0
  while token:
    sample = nusc.get('sample', token)
    for camera in options.cameras:
      try:
        yield sample_frame(nusc, sample, index, camera, scene['name'], lidarseg_files,
                           fine_to_seg, options, config, skip)
      except builder.CorruptInputError as e:
        skip(e.path, e.reason)
    token, index = sample['next'], index + 1


def load_nuscenes(dataroot: str, version: str):
  if not os.path.isdir(os.path.join(dataroot, version)):
    raise FileNotFoundError(f'{os.path.join(dataroot, version)} not found: manual_dir must be '
                            f'the nuScenes dataroot holding the {version} tables')
  try:
    with contextlib.redirect_stdout(io.StringIO()):  # the devkit prints its loading progress
      return NuScenes(version=version, dataroot=dataroot, verbose=False)
  except ValueError:  # json.JSONDecodeError: the devkit does not say which table
    for path in table_files(dataroot, version):
      files.read_json(path, 'restore it from the nuScenes release')  # raises, naming it
    raise
  except KeyError as e:  # a record without a field the devkit indexes on
    raise ValueError(f'the nuScenes tables in {os.path.join(dataroot, version)} lack the field '
                     f'{e} the devkit indexes them by: a table is damaged or from another '
                     'release') from e


def scenes_of_split(nusc, scene_split: str) -> list[dict[str, Any]]:
  if scene_split == 'all':
    return list(nusc.scene)
  splits = create_splits_scenes()
  if scene_split not in splits:
    raise ValueError(f'scene split {scene_split!r}: expected all or one of {sorted(splits)}')
  names = set(splits[scene_split])
  return [s for s in nusc.scene if s['name'] in names]


class Converter:
  """Loads the devkit tables once per worker (Beam DoFn.setup)."""

  def __init__(self, manual_dir: str, config: builder.Config):
    self.options = Options(**config.options)
    self.config = config
    self.nusc = load_nuscenes(manual_dir, self.options.version)
    self.lidarseg_files = lidarseg_files(self.nusc)
    self.fine_to_seg = fine_to_seg_table(self.nusc) if self.lidarseg_files else None

  def convert(self, scene_token: str, skip: builder.Report) -> Iterator[builder.Frame]:
    return convert_scene(scene_token, skip, self.nusc, self.lidarseg_files, self.fine_to_seg,
                         self.options, self.config)


def lidarseg_files(nusc) -> dict[str, str]:
  """{LIDAR_TOP sample_data token: its lidarseg .bin (dataroot-relative)}; {} without lidarseg."""
  return {r['sample_data_token']: r['filename'] for r in getattr(nusc, 'lidarseg', None) or []}


def table_files(dataroot: str, version: str) -> tuple[str, ...]:
  """The devkit tables every scene is read through: <version>/*.json (and lidarseg's
  <version>/*.json under lidarseg/ when it is installed apart)."""
  return tuple(sorted(glob.glob(os.path.join(dataroot, version, '*.json'))
                      + glob.glob(os.path.join(dataroot, 'lidarseg', version, '*.json'))))


def scene_files(nusc, scene: dict[str, Any], cameras: Sequence[str],
                lidarseg_files: dict[str, str]) -> tuple[str, ...]:
  """The files a scene's keyframes are converted from: each keyframe's LIDAR_TOP sweep, its
  camera images and its lidarseg labels."""
  paths, token = [], scene['first_sample_token']
  while token:
    sample = nusc.get('sample', token)
    for channel in ('LIDAR_TOP', *cameras):
      if channel in sample['data']:
        sd_token = sample['data'][channel]
        paths.append(nusc.get('sample_data', sd_token)['filename'])
        if sd_token in lidarseg_files:
          paths.append(lidarseg_files[sd_token])
    token = sample['next']
  return tuple(os.path.join(nusc.dataroot, p) for p in paths)


def split_units(manual_dir: str, config: builder.Config) -> dict[str, list[builder.WorkUnit]]:
  options = Options(**config.options)
  nusc = load_nuscenes(manual_dir, options.version)
  channels = {s['channel'] for s in nusc.sensor if s['modality'] == 'camera'}
  if not set(options.cameras) <= channels:
    raise ValueError(f'cameras {list(options.cameras)}: the cameras of {options.version} are '
                     f'{sorted(channels)}')
  tables = table_files(manual_dir, options.version)
  lidarseg = lidarseg_files(nusc)
  units = {}
  for split, scene_split in options.splits:
    scenes = scenes_of_split(nusc, scene_split)
    if scenes:
      units[split] = [builder.WorkUnit(s['name'], s['token'],
                                       tables + scene_files(nusc, s, options.cameras, lidarseg))
                      for s in scenes]
  if not units:
    raise ValueError(f'{manual_dir}: none of the scene splits {dict(options.splits)} has a '
                     f'scene in {options.version}')
  return units


def _config(name: str, version: str, splits, height: int = 288,
            width: int = 512) -> builder.Config:
  return builder.Config(name=name, image_height=height, image_width=width,
                        options=dataclasses.asdict(Options(version=version, splits=splits)),
                        description=f'CAM_FRONT of {version} at {height} x {width}')


class LemumoNuscenes(builder.RecordBuilder):
  """nuScenes: manual_dir = the devkit dataroot (<version>/*.json, samples/, lidarseg/)."""

  DATASET = 'nuscenes'
  COMPANION = 'depth'
  SEG_CLASSES = SEG_CLASSES
  BUILDER_CONFIGS = [
      _config('front_288x512', 'v1.0-trainval', (('train', 'train'), ('val', 'val'))),
      _config('mini_front_288x512', 'v1.0-mini', (('train', 'mini_train'), ('val', 'mini_val'))),
  ]
  split_units = staticmethod(split_units)
  make_converter = staticmethod(Converter)
