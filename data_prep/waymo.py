"""Waymo Open Dataset perception v1 (TFRecord files of Frame protos) as a TFDS dataset.

Input: the v1 release's TFRecord files, one driving segment per file, one serialized
waymo.open_dataset.Frame per record at 10 Hz. The TFRecord framing is read with
tf.data.TFRecordDataset (maintained, checks the CRCs and reports a truncated file as
DataLossError); TensorFlow is imported lazily, in the reader only. Frames are parsed with the
waymo-open-dataset wheel's dataset_pb2 (plain protobuf); its TF-based range-image utilities
are reimplemented in numpy here (tests/test_data_prep_waymo.py checks them against the
wheel's own frame_utils).

Per kept frame (every --frame_stride-th of a segment, default 5: 10 Hz -> 2 Hz) and camera:
  rgb           the camera JPEG, centre-cropped to the stored aspect ratio and resized
  companion     LiDAR depth map / 80 m: the first returns of every laser (TOP through its
                per-pixel ego pose) in the vehicle frame, then the camera frame; each return
                sits at the pixel of Waymo's own camera projection where the range image
                carries one (it models lens distortion and the rolling shutter), otherwise at
                its pinhole projection (--projection=pinhole forces the latter); nearest wins
  depth_target  the same map in metres (camera z)
  seg           the camera_segmentation_label where present (semantic = panoptic // divisor,
                class index = Waymo CameraSegmentation type - 1, TYPE_UNDEFINED -> 255); 255
                everywhere on frames without one
  boxes3d       laser labels TYPE_VEHICLE -> car, TYPE_PEDESTRIAN -> pedestrian, TYPE_CYCLIST
                -> cyclist (TYPE_SIGN, TYPE_UNKNOWN dropped), moved into the camera frame with
                yaw about camera y, kept when the whole box is in front of the camera and its
                projection overlaps the image
  boxes2d       the 8 vehicle-frame corners of those boxes through the full camera
                extrinsic (roll and pitch included) and the pinhole K, clipped
                (classes_2d = CLASSES_3D); the keep test uses the same corners
  intrinsics    the pinhole K of the stored image from the calibration's [f_u, f_v, c_u, c_v,
                k1, k2, p1, p2, k3], the distortion terms ignored. Waymo's camera model puts
                the left image edge at u = 0 (pixel i spans [i, i + 1)), which is already our
                convention: c_u, c_v are used as they are
Work unit = one TFRecord file; a file that cannot be read, is empty or does not hold Frames is
skipped as a whole and reported by name (data_prep/builder.py).

Splits (builder option `splits`): train = <manual_dir>/training/*.tfrecord, val =
<manual_dir>/validation/*.tfrecord (the v1 release's folders).
  python -m data_prep.build waymo --manual_dir=/data/waymo/v1 --data_dir=/data/tfds

~460 lines: the range-image geometry is reimplemented here in numpy (the wheel's is TF-based)
and belongs beside the frame conversion that uses it.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError
from waymo_open_dataset import dataset_pb2
from waymo_open_dataset import label_pb2
from waymo_open_dataset.protos import camera_segmentation_pb2

from data_prep import builder
from data_prep import depth
from lemumo_jax.data import geometry
from lemumo_jax.data import schema

LABEL_CLASSES = {
    label_pb2.Label.TYPE_VEHICLE: schema.CLASSES_3D.index('car'),
    label_pb2.Label.TYPE_PEDESTRIAN: schema.CLASSES_3D.index('pedestrian'),
    label_pb2.Label.TYPE_CYCLIST: schema.CLASSES_3D.index('cyclist'),
}
_SEG_TYPES = sorted(camera_segmentation_pb2.CameraSegmentation.Type.items(), key=lambda kv: kv[1])
# Index = Waymo type value - 1 (TYPE_UNDEFINED = 0 becomes the ignore label).
SEG_CLASSES = tuple(name[len('TYPE_'):].lower() for name, value in _SEG_TYPES if value > 0)
assert [value for _, value in _SEG_TYPES] == list(range(len(SEG_CLASSES) + 1)), _SEG_TYPES

# Waymo's camera frame (x forward, y left, z up) -> ours (x right, y down, z forward).
WAYMO_CAMERA_TO_OURS = np.array(
    [[0, -1, 0, 0], [0, 0, -1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], np.float64)


@dataclasses.dataclass(frozen=True)
class Options:
  cameras: tuple[str, ...] = ('FRONT',)
  frame_stride: int = 5
  projection: str = 'auto'  # 'auto': Waymo's camera projections where present; 'pinhole'
  splits: tuple[tuple[str, str], ...] = (('train', 'training/*.tfrecord'),
                                         ('val', 'validation/*.tfrecord'))

  def __post_init__(self):  # from JSON (builder options), lists become tuples
    object.__setattr__(self, 'cameras', tuple(self.cameras))
    object.__setattr__(self, 'splits', tuple(tuple(s) for s in self.splits))
    if self.projection not in ('auto', 'pinhole'):
      raise ValueError(f"projection must be 'auto' or 'pinhole', got {self.projection!r}")
    if self.frame_stride < 1:
      raise ValueError(f'frame_stride must be >= 1, got {self.frame_stride}')


def _tensorflow():
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], 'GPU')  # the reader needs no accelerator; JAX owns it
  except RuntimeError:
    pass  # devices were initialised earlier in this process
  return tf


def read_frames(path: str, stride: int) -> Iterator[tuple[int, bytes]]:
  """Yields (index in the segment, serialized Frame) for every stride-th record of a file."""
  tf = _tensorflow()
  try:
    for index, raw in enumerate(tf.data.TFRecordDataset(path).as_numpy_iterator()):
      if index % stride == 0:
        yield index, raw
  except tf.errors.OpError as e:
    raise builder.CorruptInputError(path, f'{type(e).__name__}: {e.message}') from e


def _transform(proto: dataset_pb2.Transform, path: str, what: str) -> np.ndarray:
  values = np.asarray(proto.transform, np.float64)
  if values.size != 16:
    raise builder.CorruptInputError(path, f'{what} has {values.size} values, expected 16')
  return values.reshape(4, 4)


def _decompress(blob: bytes, message_cls, path: str, what: str) -> np.ndarray:
  """zlib-compressed serialized MatrixFloat / MatrixInt32 -> array of its shape.dims."""
  try:
    message = message_cls.FromString(zlib.decompress(blob))
  except (zlib.error, DecodeError) as e:
    raise builder.CorruptInputError(path, f'{what}: {type(e).__name__}: {e}') from e
  dims = tuple(message.shape.dims)
  data = np.asarray(message.data)
  if data.size != int(np.prod(dims)):
    raise builder.CorruptInputError(path, f'{what}: {data.size} values for shape {dims}')
  return data.reshape(dims)


def rotation_rpy(roll: np.ndarray, pitch: np.ndarray, yaw: np.ndarray) -> np.ndarray:
  """[..., 3, 3] = Rz(yaw) Ry(pitch) Rx(roll), Waymo's convention for range-image pixel poses."""
  cr, sr, cp, sp, cy, sy = (np.cos(roll), np.sin(roll), np.cos(pitch), np.sin(pitch),
                            np.cos(yaw), np.sin(yaw))
  return np.stack([
      np.stack([cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr], -1),
      np.stack([sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr], -1),
      np.stack([-sp, cp * sr, cp * cr], -1),
  ], -2)


def beam_inclinations(calibration: dataset_pb2.LaserCalibration, height: int) -> np.ndarray:
  """[H] inclination of each range-image row, row 0 = the highest beam (radians).

  Calibrations list beams bottom-up; lasers without a list have uniformly spaced beams between
  beam_inclination_min and _max, each at the centre of its bin.
  """
  if len(calibration.beam_inclinations):
    inclinations = np.asarray(calibration.beam_inclinations, np.float64)
  else:
    low, high = calibration.beam_inclination_min, calibration.beam_inclination_max
    inclinations = low + (np.arange(height) + 0.5) / height * (high - low)
  return inclinations[::-1]


def range_image_to_points(range_m: np.ndarray, extrinsic: np.ndarray, inclinations: np.ndarray,
                          pixel_pose: np.ndarray | None = None,
                          frame_pose: np.ndarray | None = None) -> np.ndarray:
  """Range image [H, W] (metres) -> points [H, W, 3] in the vehicle frame at frame_pose.

  Column c looks along azimuth pi - (c + 0.5) 2 pi / W in the vehicle-aligned laser frame, so
  the laser's yaw in its extrinsic is subtracted. pixel_pose [H, W, 6] (roll, pitch, yaw, x,
  y, z: vehicle -> world when that pixel fired; TOP only) undoes the ego motion during the
  sweep, through the world frame back into the vehicle frame at frame_pose [4, 4].
  """
  height, width = range_m.shape
  range_m = np.asarray(range_m, np.float64)
  az_correction = np.arctan2(extrinsic[1, 0], extrinsic[0, 0])
  azimuth = ((width - np.arange(width) - 0.5) / width * 2.0 - 1.0) * np.pi - az_correction
  inclination = np.asarray(inclinations, np.float64)[:, None]
  cos_incl = np.cos(inclination)
  points = np.stack([np.cos(azimuth)[None] * cos_incl * range_m,
                     np.sin(azimuth)[None] * cos_incl * range_m,
                     np.sin(inclination) * range_m], -1)
  points = geometry.transform_points(extrinsic, points.reshape(-1, 3)).reshape(height, width, 3)
  if pixel_pose is not None:
    pixel_pose = np.asarray(pixel_pose, np.float64)
    rotation = rotation_rpy(pixel_pose[..., 0], pixel_pose[..., 1], pixel_pose[..., 2])
    world = np.einsum('hwij,hwj->hwi', rotation, points) + pixel_pose[..., 3:]
    points = geometry.transform_points(np.linalg.inv(frame_pose), world.reshape(-1, 3))
    points = points.reshape(height, width, 3)
  return points


@dataclasses.dataclass(frozen=True)
class LidarReturns:
  points: np.ndarray  # [P, 3] vehicle frame
  projections: np.ndarray  # [P, 6] int (camera, x, y, camera, x, y); 0 = no camera
  has_projection: np.ndarray  # [P] bool: the laser's range image carried projections


def lidar_returns(frame: dataset_pb2.Frame, calibrations: dict[int, Any],
                  path: str) -> LidarReturns:
  """First returns (range > 0) of every laser, lasers in name order, pixels row-major."""
  points, projections, has_projection = [], [], []
  frame_pose = _transform(frame.pose, path, 'frame pose')
  for laser in sorted(frame.lasers, key=lambda laser: laser.name):
    ri = laser.ri_return1
    if not ri.range_image_compressed:
      continue
    laser_name = dataset_pb2.LaserName.Name.Name(laser.name)
    if laser.name not in calibrations:
      raise builder.CorruptInputError(path, f'frame has no calibration for laser {laser_name}')
    calibration = calibrations[laser.name]
    image = _decompress(ri.range_image_compressed, dataset_pb2.MatrixFloat, path,
                        f'{laser_name} range image')
    range_m = image[..., 0]
    pixel_pose = None
    if laser.name == dataset_pb2.LaserName.TOP and ri.range_image_pose_compressed:
      pixel_pose = _decompress(ri.range_image_pose_compressed, dataset_pb2.MatrixFloat, path,
                               f'{laser_name} range image pose')
    inclinations = beam_inclinations(calibration, range_m.shape[0])
    if inclinations.size != range_m.shape[0]:
      raise builder.CorruptInputError(path, f'{laser_name}: {inclinations.size} beam '
                                     f'inclinations for a range image of {range_m.shape[0]} rows')
    xyz = range_image_to_points(range_m, _transform(calibration.extrinsic, path, 'extrinsic'),
                                inclinations, pixel_pose, frame_pose)
    valid = range_m > 0
    points.append(xyz[valid])
    if ri.camera_projection_compressed:
      cp = _decompress(ri.camera_projection_compressed, dataset_pb2.MatrixInt32, path,
                       f'{laser_name} camera projection')
      projections.append(cp[valid].astype(np.int64))
      has_projection.append(np.ones(int(valid.sum()), bool))
    else:
      projections.append(np.zeros((int(valid.sum()), 6), np.int64))
      has_projection.append(np.zeros(int(valid.sum()), bool))
  if not points:
    return LidarReturns(np.zeros((0, 3)), np.zeros((0, 6), np.int64), np.zeros(0, bool))
  return LidarReturns(np.concatenate(points), np.concatenate(projections),
                      np.concatenate(has_projection))


def camera_from_vehicle(calibration: dataset_pb2.CameraCalibration, path: str) -> np.ndarray:
  """[4, 4] vehicle frame -> our camera frame (the extrinsic is camera -> vehicle)."""
  extrinsic = _transform(calibration.extrinsic, path, 'camera extrinsic')
  return WAYMO_CAMERA_TO_OURS @ np.linalg.inv(extrinsic)


def camera_intrinsics(calibration: dataset_pb2.CameraCalibration, path: str) -> np.ndarray:
  """[3, 3] pinhole K from [f_u, f_v, c_u, c_v, distortion...]; Waymo's pixel coordinates put
  the left image edge at 0, as ours do (no half-pixel shift)."""
  values = list(calibration.intrinsic)
  if len(values) < 4:
    raise builder.CorruptInputError(path, f'camera intrinsic has {len(values)} values')
  f_u, f_v, c_u, c_v = values[:4]
  return np.array([[f_u, 0, c_u], [0, f_v, c_v], [0, 0, 1]], np.float64)


def vehicle_boxes_to_camera(boxes: np.ndarray, cam_from_vehicle: np.ndarray) -> np.ndarray:
  """[K, 7] (x, y, z, length, width, height, heading about vehicle z) -> schema boxes [K, 7].

  Yaw is the heading direction's angle in the camera x-z plane (rotation about camera y): the
  schema's boxes have no roll or pitch, so the camera's small tilt is not carried into them.
  2D boxes come from `vehicle_box_corners` instead, which keeps the tilt.
  """
  boxes = np.asarray(boxes, np.float64).reshape(-1, 7)
  centers = geometry.transform_points(cam_from_vehicle, boxes[:, :3])
  heading = np.stack([np.cos(boxes[:, 6]), np.sin(boxes[:, 6]), np.zeros(len(boxes))], -1)
  direction = heading @ cam_from_vehicle[:3, :3].T
  yaw = np.arctan2(-direction[:, 2], direction[:, 0])
  return np.concatenate([centers, boxes[:, 3:6], yaw[:, None]], -1)


def vehicle_box_corners(boxes: np.ndarray, cam_from_vehicle: np.ndarray) -> np.ndarray:
  """[K, 8, 3] corners of vehicle-frame boxes [K, 7] (heading about vehicle z) in our camera
  frame, through the full extrinsic (the camera's roll and pitch included)."""
  boxes = np.asarray(boxes, np.float64).reshape(-1, 7)
  signs = np.array([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)]) / 2.0
  local = signs[None] * boxes[:, None, 3:6]  # length along x, width along y, height along z
  cos, sin = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])
  zeros, ones = np.zeros_like(cos), np.ones_like(cos)
  rotation = np.stack([np.stack([cos, -sin, zeros], -1), np.stack([sin, cos, zeros], -1),
                       np.stack([zeros, zeros, ones], -1)], -2)
  corners = np.einsum('kij,kcj->kci', rotation, local) + boxes[:, None, :3]
  return geometry.transform_points(cam_from_vehicle, corners.reshape(-1, 3)).reshape(-1, 8, 3)


def laser_boxes(frame: dataset_pb2.Frame, where: str,
                report: builder.Report) -> tuple[np.ndarray, np.ndarray]:
  """Vehicle-frame boxes [K, 7] and CLASSES_3D indices [K] of the kept laser labels. A box with
  a non-finite value is reported (`where`, the label id, the field) and left out."""
  boxes, classes = [], []
  for label in frame.laser_labels:
    if label.type in LABEL_CLASSES:
      b = label.box
      box = [b.center_x, b.center_y, b.center_z, b.length, b.width, b.height, b.heading]
      bad = [f'{name} {value!r}' for name, value in zip(_BOX_FIELDS, box)
             if not np.isfinite(value)]
      if bad:
        report.bad_label(f'{where} laser label {label.id!r}',
                         f'box {", ".join(bad)} not finite')
        continue
      boxes.append(box)
      classes.append(LABEL_CLASSES[label.type])
  return np.asarray(boxes, np.float64).reshape(-1, 7), np.asarray(classes, np.int32)


_BOX_FIELDS = ('center_x', 'center_y', 'center_z', 'length', 'width', 'height', 'heading')


def _decode_image(data: bytes, path: str, what: str) -> np.ndarray:
  try:
    return builder.decode_image(data, path)
  except builder.CorruptInputError as e:
    raise builder.CorruptInputError(path, f'{what}: {e.reason}') from e


def camera_segmentation(image: dataset_pb2.CameraImage, grid: depth.GridTransform,
                        path: str) -> np.ndarray:
  label = image.camera_segmentation_label
  if not label.panoptic_label:
    return np.full((grid.height, grid.width), schema.IGNORE_LABEL, np.uint8)
  if label.panoptic_label_divisor <= 0:
    raise builder.CorruptInputError(path, 'camera segmentation has no panoptic_label_divisor')
  semantic = _decode_image(label.panoptic_label, path, 'panoptic label').astype(np.int64)
  semantic //= label.panoptic_label_divisor
  known = (semantic >= 1) & (semantic <= len(SEG_CLASSES))
  source = np.where(known, semantic - 1, schema.IGNORE_LABEL).astype(np.uint8)
  if source.shape != (grid.src_height, grid.src_width):
    raise builder.CorruptInputError(path, f'panoptic label shape {source.shape} != image shape '
                                   f'{(grid.src_height, grid.src_width)}')
  return grid.labels(source)


def camera_frame(frame: dataset_pb2.Frame, frame_index: int, image: dataset_pb2.CameraImage,
                 calibration: dataset_pb2.CameraCalibration, lidar: LidarReturns,
                 boxes: tuple[np.ndarray, np.ndarray], options: Options,
                 config: builder.Config, path: str) -> builder.Frame:
  """One record: a camera image of a frame with its depth map, labels and its laser `boxes`
  (laser_boxes)."""
  camera = dataset_pb2.CameraName.Name.Name(image.name)
  rgb = _decode_image(image.image, path, f'frame {frame_index} {camera} image')
  if rgb.ndim != 3 or rgb.shape[2] != 3:
    raise builder.CorruptInputError(path, f'{camera} image has shape {rgb.shape}')
  if (calibration.height, calibration.width) != rgb.shape[:2]:
    raise builder.CorruptInputError(path, f'{camera} image {rgb.shape[:2]} != calibration '
                                   f'{(calibration.height, calibration.width)}')
  height, width = config.image_height, config.image_width
  grid = depth.GridTransform.center_crop(rgb.shape[0], rgb.shape[1], height, width)
  intrinsics = grid.intrinsics(camera_intrinsics(calibration, path))
  cam_from_vehicle = camera_from_vehicle(calibration, path)

  points_cam = geometry.transform_points(cam_from_vehicle, lidar.points)
  uv, z = geometry.project_points(points_cam, intrinsics)
  if options.projection == 'auto':
    cp = lidar.projections
    first = lidar.has_projection & (cp[:, 0] == image.name)
    second = lidar.has_projection & (cp[:, 3] == image.name) & ~first
    # A return with projections is visible in this camera only where Waymo says so; its
    # integer (column, row) names a pixel, whose centre is at +0.5.
    uv[lidar.has_projection] = np.nan
    uv[first] = grid.points(cp[first, 1:3] + 0.5)
    uv[second] = grid.points(cp[second, 4:6] + 0.5)
  companion, depth_m = depth.render_depth_at_pixels(uv, z, height, width)

  boxes_v, classes = boxes
  boxes3d = vehicle_boxes_to_camera(boxes_v, cam_from_vehicle)
  boxes2d, keep = geometry.corners_to_2d(vehicle_box_corners(boxes_v, cam_from_vehicle),
                                         intrinsics, height, width)
  record = {
      'rgb': grid.rgb(rgb),
      'companion': companion,
      'depth_target': depth_m,
      'seg': camera_segmentation(image, grid, path),
      'boxes3d': boxes3d[keep].astype(np.float32),
      'boxes3d_cls': classes[keep],
      'boxes2d': boxes2d[keep],
      'boxes2d_cls': classes[keep],
      'intrinsics': intrinsics.astype(np.float32),
      'meta': {'dataset': 'waymo', 'scene': frame.context.name, 'frame': frame_index,
               'camera': camera, 'timestamp': int(frame.timestamp_micros)},
  }
  return record, (image.image if grid.is_identity else None)


def convert_segment(path: str, options: Options, config: builder.Config,
                    report: builder.Report) -> Iterator[builder.Frame]:
  """Frames of one TFRecord file (a work unit); raises CorruptInputError to drop it whole."""
  camera_ids = [dataset_pb2.CameraName.Name.Value(name) for name in options.cameras]
  camera_calibrations: dict[int, Any] = {}
  laser_calibrations: dict[int, Any] = {}
  num_records = 0
  for index, raw in read_frames(path, options.frame_stride):
    num_records += 1
    try:
      frame = dataset_pb2.Frame.FromString(raw)
    except DecodeError as e:
      raise builder.CorruptInputError(path, f'record {index} is not a Waymo Frame proto ({e}); '
                                      'is this a perception v1 segment file?') from e
    if not frame.HasField('pose') or not frame.context.name:
      # Protobuf parses many byte strings as some message; a real Frame has both.
      raise builder.CorruptInputError(
          path, f'record {index} is not a Waymo Frame (no vehicle pose, no context name); '
          'is this a perception v1 segment file?')
    # Every v1 frame repeats the segment's calibrations; keep the last ones seen regardless.
    camera_calibrations.update({c.name: c for c in frame.context.camera_calibrations})
    laser_calibrations.update({c.name: c for c in frame.context.laser_calibrations})
    lidar = lidar_returns(frame, laser_calibrations, path)
    images = {image.name: image for image in frame.images}
    boxes = laser_boxes(frame, f'{path} record {index}', report)
    for camera_id, camera in zip(camera_ids, options.cameras):
      if camera_id not in images or camera_id not in camera_calibrations:
        have = sorted(dataset_pb2.CameraName.Name.Name(i) for i in images)
        what = 'image' if camera_id not in images else 'calibration'
        raise builder.CorruptInputError(
            path, f'frame {index} has no {camera} {what} (its images: {have}); the builder '
            f'option cameras={list(options.cameras)} asks for it')
      yield camera_frame(frame, index, images[camera_id], camera_calibrations[camera_id], lidar,
                         boxes, options, config, path)
  if num_records == 0:
    raise builder.CorruptInputError(path, 'no records: an empty TFRecord file')


class Converter:
  def __init__(self, manual_dir: str, config: builder.Config):
    del manual_dir  # the units carry their paths
    self.config = config
    self.options = Options(**config.options)

  def convert(self, path: str, report: builder.Report) -> Iterator[builder.Frame]:
    # A corrupt file is dropped whole, by raising; `report` names the boxes left out.
    return convert_segment(path, self.options, self.config, report)


def split_units(manual_dir: str, config: builder.Config) -> dict[str, list[builder.WorkUnit]]:
  """{split: one unit per TFRecord file matched by the split's glob under manual_dir}."""
  options = Options(**config.options)
  for name in options.cameras:
    if name not in dataset_pb2.CameraName.Name.keys() or name == 'UNKNOWN':
      raise ValueError(f'cameras: unknown Waymo camera {name!r} (dataset_pb2.CameraName)')
  files: dict[str, set[str]] = {}
  for split, pattern in options.splits:  # a split may be given several globs
    files.setdefault(split, set()).update(glob.glob(os.path.join(manual_dir, pattern)))
  units = {split: [builder.WorkUnit(os.path.basename(p), p, (p,))
                   for p in sorted(paths)]
           for split, paths in files.items() if paths}
  if not units:
    raise FileNotFoundError(f'{manual_dir}: no file matches the splits {dict(options.splits)}; '
                            'manual_dir must hold the v1 release folders (training/, '
                            'validation/ of *.tfrecord segment files)')
  return units


def _config(name: str, cameras: tuple[str, ...], height: int, width: int) -> builder.Config:
  return builder.Config(name=name, image_height=height, image_width=width,
                        options=dataclasses.asdict(Options(cameras=cameras)),
                        description=f'{", ".join(cameras)} at {height} x {width}')


class LemumoWaymo(builder.RecordBuilder):
  """Waymo Open Dataset perception v1: <manual_dir>/{training,validation}/*.tfrecord."""

  DATASET = 'waymo'
  COMPANION = 'depth'
  SEG_CLASSES = SEG_CLASSES
  BUILDER_CONFIGS = [
      _config('front_320x480', ('FRONT',), 320, 480),
      _config('all_cameras_320x480', ('FRONT', 'FRONT_LEFT', 'FRONT_RIGHT', 'SIDE_LEFT',
                                      'SIDE_RIGHT'), 320, 480),
  ]
  split_units = staticmethod(split_units)
  make_converter = staticmethod(Converter)
