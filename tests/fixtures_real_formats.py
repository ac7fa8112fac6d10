"""Tiny datasets written in each source's REAL on-disk format, for the data_prep tests.

  Waymo     TFRecord files of waymo.open_dataset.Frame protos (zlib-compressed MatrixFloat
            range images, camera JPEGs, calibrations, laser labels, panoptic camera labels)
  nuScenes  a v1.0-mini-style table set that nuscenes-devkit's NuScenes() loads, with
            .pcd.bin LiDAR sweeps, camera JPEGs and lidarseg .bin labels
  FLIR      the ADAS v2 release layout: video_{rgb,thermal}_test/{data/, coco.json,
            index.json}, the thermal folder's analyticsData/ 16-bit TIFFs and the root
            rgb_to_thermal_vid_map.json

Everything is generated from explicit parameters (the module constants below) so tests can
compute the expected geometry independently. One module of ~650 lines on purpose: the three
writers share those constants and the scene they describe.
"""

from __future__ import annotations

import functools
import io
import json
import os
import zlib
from collections.abc import Sequence

import numpy as np
from PIL import Image

# ---------------------------------------------------------------------------------------------
# Waymo


def _rz(yaw: float) -> np.ndarray:
  c, s = np.cos(yaw), np.sin(yaw)
  return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], np.float64)


def _rigid(rotation: np.ndarray, translation) -> np.ndarray:
  out = np.eye(4)
  out[:3, :3] = rotation
  out[:3, 3] = translation
  return out


WAYMO_IMAGE_HW = (64, 96)
WAYMO_INTRINSIC = [60.0, 58.0, 48.0, 30.0, 0.01, -0.002, 0.0, 0.0, 0.0]  # f_u f_v c_u c_v k...
WAYMO_CAMERA_EXTRINSIC = _rigid(_rz(0.08), [1.5, 0.1, 2.0])  # camera -> vehicle
WAYMO_TOP_EXTRINSIC = _rigid(_rz(0.3), [0.0, 0.0, 2.5])  # laser -> vehicle
WAYMO_FRONT_EXTRINSIC = _rigid(_rz(-0.2), [4.0, 0.0, 0.8])
WAYMO_TOP_SHAPE = (4, 360)
WAYMO_TOP_INCLINATIONS = [-0.12, -0.05, -0.02, 0.03]  # bottom-up, like the real calibrations
WAYMO_FRONT_SHAPE = (3, 90)
WAYMO_FRONT_INCLINATION_RANGE = (-0.5, 0.2)
WAYMO_FRAME_POSE_RPY_XYZ = (0.0, 0.0, 0.7, 100.0, 50.0, 3.0)
# TOP returns (row, column, range m). Column 162 looks about 10 degrees left of the laser's
# +x, i.e. near the vehicle's forward axis given the laser's 0.3 rad yaw.
WAYMO_TOP_RETURNS = [(1, 162, 20.0), (2, 160, 12.0), (0, 165, 8.0), (3, 10, 30.0)]
WAYMO_FRONT_RETURNS = [(0, 40, 6.0), (1, 50, 9.0), (2, 44, 7.5)]
# (type, center xyz, length, width, height, heading) in the vehicle frame.
WAYMO_LABELS = [
    ('TYPE_VEHICLE', (18.0, 1.0, 1.0), 4.5, 1.9, 1.6, 0.3),
    ('TYPE_PEDESTRIAN', (12.0, -1.5, 0.9), 0.8, 0.7, 1.8, -1.2),
    ('TYPE_SIGN', (14.0, 3.0, 2.0), 0.1, 0.8, 0.8, 0.0),
    ('TYPE_CYCLIST', (-15.0, 0.0, 0.9), 1.8, 0.6, 1.7, 3.0),  # behind the camera: dropped
]
WAYMO_SEG_DIVISOR = 1000


def _waymo_pb2():
  from waymo_open_dataset import dataset_pb2, label_pb2  # pylint: disable=g-import-not-at-top
  return dataset_pb2, label_pb2


def waymo_rotation_rpy(roll: float, pitch: float, yaw: float) -> np.ndarray:
  """Rz(yaw) Ry(pitch) Rx(roll), written out independently of data_prep.waymo."""
  rx = np.array([[1, 0, 0], [0, np.cos(roll), -np.sin(roll)], [0, np.sin(roll), np.cos(roll)]])
  ry = np.array([[np.cos(pitch), 0, np.sin(pitch)], [0, 1, 0], [-np.sin(pitch), 0,
                                                                 np.cos(pitch)]])
  return _rz(yaw) @ ry @ rx


def waymo_frame_pose() -> np.ndarray:
  roll, pitch, yaw, *xyz = WAYMO_FRAME_POSE_RPY_XYZ
  return _rigid(waymo_rotation_rpy(roll, pitch, yaw), xyz)


def waymo_expected_point(row: int, column: int, range_m: float, extrinsic: np.ndarray,
                         inclinations_bottom_up, width: int) -> np.ndarray:
  """The vehicle-frame point of a range-image pixel per Waymo's documented convention:
  column c looks along azimuth pi - (c + 0.5) 2 pi / W in the vehicle-aligned laser frame,
  row 0 is the highest beam."""
  inclination = list(inclinations_bottom_up)[::-1][row]
  azimuth = np.pi - (column + 0.5) * 2 * np.pi / width - np.arctan2(extrinsic[1, 0],
                                                                     extrinsic[0, 0])
  local = range_m * np.array([np.cos(azimuth) * np.cos(inclination),
                              np.sin(azimuth) * np.cos(inclination), np.sin(inclination)])
  return extrinsic[:3, :3] @ local + extrinsic[:3, 3]


def waymo_pixel(point_vehicle: np.ndarray,
                extrinsic: np.ndarray = WAYMO_CAMERA_EXTRINSIC) -> tuple[float, float, float]:
  """(u, v, depth) of a vehicle-frame point in the FRONT camera (distortion-free), in Waymo's
  pixel coordinates: the left image edge is u = 0, pixel i spans [i, i + 1)."""
  x, y, z = np.linalg.inv(extrinsic)[:3] @ np.append(point_vehicle, 1.0)
  f_u, f_v, c_u, c_v = WAYMO_INTRINSIC[:4]
  return f_u * (-y / x) + c_u, f_v * (-z / x) + c_v, x


def _matrix(values: np.ndarray, int32: bool = False) -> bytes:
  dataset_pb2, _ = _waymo_pb2()
  message = dataset_pb2.MatrixInt32() if int32 else dataset_pb2.MatrixFloat()
  message.shape.dims.extend(values.shape)
  message.data.extend(values.reshape(-1).tolist())
  return zlib.compress(message.SerializeToString())


def _jpeg(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='JPEG', quality=95)
  return buffer.getvalue()


def waymo_camera_image() -> np.ndarray:
  h, w = WAYMO_IMAGE_HW
  yy, xx = np.mgrid[0:h, 0:w]
  return np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], -1).astype(np.uint8)


def waymo_panoptic_semantic() -> np.ndarray:
  """[H, W] semantic Waymo types: sky on top, road below, an undefined block, a car."""
  h, w = WAYMO_IMAGE_HW
  semantic = np.full((h, w), 20, np.int64)  # TYPE_ROAD
  semantic[:h // 2] = 25  # TYPE_SKY
  semantic[:8, :8] = 0  # TYPE_UNDEFINED
  semantic[40:56, 30:60] = 2  # TYPE_CAR
  return semantic


def _panoptic_png() -> bytes:
  semantic = waymo_panoptic_semantic()
  instance = np.where(semantic == 2, 7, 0)
  panoptic = (semantic * WAYMO_SEG_DIVISOR + instance).astype(np.uint16)
  buffer = io.BytesIO()
  Image.fromarray(panoptic).save(buffer, format='PNG')
  return buffer.getvalue()


def _range_image(shape, returns) -> np.ndarray:
  image = np.zeros((*shape, 4), np.float32)
  image[..., 3] = -1.0  # is_in_nlz: -1 = no
  for row, col, range_m in returns:
    image[row, col, 0] = range_m
    image[row, col, 1] = 0.5  # intensity
  return image


def _camera_projections(shape, returns, extrinsic, inclinations, camera_id: int,
                        use_second_slot: bool) -> np.ndarray:
  """Waymo-style [H, W, 6] projections, computed here with the distortion-free pinhole."""
  cp = np.zeros((*shape, 6), np.int32)
  h, w = WAYMO_IMAGE_HW
  for i, (row, col, range_m) in enumerate(returns):
    point = waymo_expected_point(row, col, range_m, extrinsic, inclinations, shape[1])
    u, v, depth = waymo_pixel(point)
    if depth <= 0 or not (0 <= u < w - 0.5 and 0 <= v < h - 0.5):
      continue
    pixel = (camera_id, int(np.floor(u)), int(np.floor(v)))  # the pixel the point falls in
    if use_second_slot and i == 0:
      cp[row, col] = (4, 3, 3, *pixel)  # also seen by SIDE_LEFT (first slot)
    else:
      cp[row, col, :3] = pixel
  return cp


def waymo_box_corners(center, length, width, height, heading) -> np.ndarray:
  """[8, 3] vehicle-frame corners of a Waymo label box."""
  signs = np.array([[a, b, c] for a in (-.5, .5) for b in (-.5, .5) for c in (-.5, .5)])
  return signs * [length, width, height] @ _rz(heading).T + np.asarray(center)


def waymo_projected_box(label, extrinsic: np.ndarray = WAYMO_CAMERA_EXTRINSIC):
  """(center_x, center_y, length, width) of a label's 2D box as Waymo projects it: the
  bounds of its 8 projected corners in Waymo's pixel coordinates (distortion-free here)."""
  _, center, length, width, height, heading = label
  uv = np.array([waymo_pixel(c, extrinsic)[:2] for c in
                 waymo_box_corners(center, length, width, height, heading)])
  (u1, v1), (u2, v2) = uv.min(0), uv.max(0)
  return (u1 + u2) / 2, (v1 + v2) / 2, u2 - u1, v2 - v1


def waymo_frame(index: int, *, context_name: str = 'segment-fixture', camera_projections=True,
                pixel_pose_jitter: float = 0.0, with_segmentation: bool = True,
                camera_extrinsic: np.ndarray = WAYMO_CAMERA_EXTRINSIC, with_lidar: bool = True,
                image_scale: int = 1, dense_lidar: bool = False):
  """One Frame proto of the fixture scene (identical geometry in every frame). Its FRONT
  image carries Waymo-style projected_lidar_labels of the vehicle and the pedestrian.
  image_scale > 1 (benchmarks): the camera image and calibration that many times larger (20
  gives Waymo's 1920 x 1280, textured with noise); the camera projections and labels stay at
  scale 1. dense_lidar (benchmarks): TOP a 64 x 2650 and FRONT a 200 x 600 range image of
  returns almost everywhere (random ranges), the sizes of Waymo's, without camera projections.
  """
  assert not (dense_lidar and camera_projections), 'dense_lidar has no camera projections'
  top_shape, front_shape = ((64, 2650), (200, 600)) if dense_lidar else (WAYMO_TOP_SHAPE,
                                                                          WAYMO_FRONT_SHAPE)
  top_inclinations = (np.linspace(-0.31, 0.04, 64).tolist() if dense_lidar
                      else WAYMO_TOP_INCLINATIONS)
  dataset_pb2, label_pb2 = _waymo_pb2()
  frame = dataset_pb2.Frame()
  frame.context.name = context_name
  frame.timestamp_micros = 1_550_000_000_000_000 + 100_000 * index
  frame.pose.transform.extend(waymo_frame_pose().reshape(-1).tolist())

  camera = frame.context.camera_calibrations.add()
  camera.name = dataset_pb2.CameraName.FRONT
  camera.intrinsic.extend([v * image_scale for v in WAYMO_INTRINSIC[:4]] + WAYMO_INTRINSIC[4:])
  camera.extrinsic.transform.extend(np.asarray(camera_extrinsic).reshape(-1).tolist())
  camera.height, camera.width = (n * image_scale for n in WAYMO_IMAGE_HW)
  camera.rolling_shutter_direction = dataset_pb2.CameraCalibration.LEFT_TO_RIGHT

  top = frame.context.laser_calibrations.add()
  top.name = dataset_pb2.LaserName.TOP
  top.beam_inclinations.extend(top_inclinations)
  top.beam_inclination_min, top.beam_inclination_max = top_inclinations[0], 0.04
  top.extrinsic.transform.extend(WAYMO_TOP_EXTRINSIC.reshape(-1).tolist())
  front = frame.context.laser_calibrations.add()
  front.name = dataset_pb2.LaserName.FRONT
  front.beam_inclination_min, front.beam_inclination_max = WAYMO_FRONT_INCLINATION_RANGE
  front.extrinsic.transform.extend(WAYMO_FRONT_EXTRINSIC.reshape(-1).tolist())

  image = frame.images.add()
  image.name = dataset_pb2.CameraName.FRONT
  pixels = waymo_camera_image()
  if image_scale > 1:  # large and textured, so that JPEG sizes are like a real camera's
    pixels = np.kron(pixels, np.ones((image_scale, image_scale, 1), np.uint8))
    pixels = pixels // 2 + np.random.default_rng(index).integers(0, 96, pixels.shape, np.uint8)
  image.image = _jpeg(pixels)
  image.pose.transform.extend(waymo_frame_pose().reshape(-1).tolist())
  if with_segmentation:
    image.camera_segmentation_label.panoptic_label_divisor = WAYMO_SEG_DIVISOR
    image.camera_segmentation_label.panoptic_label = _panoptic_png()

  projected = frame.projected_lidar_labels.add()
  projected.name = dataset_pb2.CameraName.FRONT
  for label_tuple in WAYMO_LABELS[:2]:
    center_x, center_y, length, width = waymo_projected_box(label_tuple, camera_extrinsic)
    label = projected.labels.add()
    label.type = label_pb2.Label.Type.Value(label_tuple[0])
    label.box.center_x, label.box.center_y = center_x, center_y
    label.box.length, label.box.width = length, width

  rng = np.random.default_rng(index)
  for name, shape, returns, extrinsic in [] if not with_lidar else [
      ('TOP', top_shape, WAYMO_TOP_RETURNS, WAYMO_TOP_EXTRINSIC),
      ('FRONT', front_shape, WAYMO_FRONT_RETURNS, WAYMO_FRONT_EXTRINSIC)]:
    laser = frame.lasers.add()
    laser.name = dataset_pb2.LaserName.Name.Value(name)
    ranges = _range_image(shape, returns)
    if dense_lidar:
      ranges[..., 0] = rng.uniform(1.0, 75.0, shape) * (rng.uniform(size=shape) > 0.05)
      ranges[..., 1] = rng.uniform(size=shape)
    laser.ri_return1.range_image_compressed = _matrix(ranges)
    if name == 'TOP':
      roll, pitch, yaw, *xyz = WAYMO_FRAME_POSE_RPY_XYZ
      pose = np.tile(np.array([roll, pitch, yaw, *xyz], np.float32), (*shape, 1))
      pose += rng.normal(scale=pixel_pose_jitter, size=pose.shape).astype(np.float32)
      laser.ri_return1.range_image_pose_compressed = _matrix(pose)
      if camera_projections:
        laser.ri_return1.camera_projection_compressed = _matrix(
            _camera_projections(shape, returns, extrinsic, WAYMO_TOP_INCLINATIONS,
                                dataset_pb2.CameraName.FRONT, use_second_slot=True), int32=True)
    elif camera_projections:
      cp = np.zeros((*shape, 6), np.int32)
      laser.ri_return1.camera_projection_compressed = _matrix(cp, int32=True)
    # A second return the converter ignores (first returns only).
    laser.ri_return2.range_image_compressed = _matrix(_range_image(shape, returns[:1]))

  for type_name, center, length, width, height, heading in WAYMO_LABELS:
    label = frame.laser_labels.add()
    label.type = label_pb2.Label.Type.Value(type_name)
    label.id = f'{type_name}-{index}'
    box = label.box
    box.center_x, box.center_y, box.center_z = center
    box.length, box.width, box.height, box.heading = length, width, height, heading
  return frame


def write_waymo_segment(path: str, num_frames: int, **frame_kwargs) -> str:
  """A real TFRecord file of `num_frames` serialized Frames (written with TensorFlow)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with tf.io.TFRecordWriter(path) as writer:
    for index in range(num_frames):
      writer.write(waymo_frame(index, **frame_kwargs).SerializeToString())
  return path


# ---------------------------------------------------------------------------------------------
# Reading the converters' output back


def build(builder_cls, manual_dir, data_dir, height: int, width: int, *, rgb_format='png',
          skip_without_companion=False, pipeline_options='', overwrite=False,
          companion_format='float32', record_compression='zstd', **options):
  """Builds the dataset with the first config of builder_cls at [height, width] and the given
  storage formats and converter options (data_prep.builder.build, the CLI's own entry)."""
  from data_prep import builder  # pylint: disable=g-import-not-at-top
  config = builder_cls.BUILDER_CONFIGS[0].derive(
      f'test_{height}x{width}', options, image_height=height, image_width=width,
      rgb_format=rgb_format, skip_without_companion=skip_without_companion,
      companion_format=companion_format, record_compression=record_compression)
  return builder.build(builder_cls, manual_dir=str(manual_dir), data_dir=str(data_dir),
                       config=config, pipeline_options=pipeline_options, overwrite=overwrite)


def read_split(built, split: str) -> list[dict]:
  """Every record of a built split through the training reader (sources.TfdsSource), sorted
  by (scene, frame, camera)."""
  from lemumo_jax.data import sources  # pylint: disable=g-import-not-at-top
  source = sources.TfdsSource(os.fspath(built.data_path), split)
  records = [source[i] for i in range(len(source))]
  return sorted(records, key=lambda r: (r['meta']['scene'], r['meta']['frame'],
                                        r['meta']['camera']))


# ---------------------------------------------------------------------------------------------
# nuScenes


def _quaternion_wxyz(rotation: np.ndarray) -> list[float]:
  from scipy.spatial.transform import Rotation  # pylint: disable=g-import-not-at-top
  x, y, z, w = Rotation.from_matrix(rotation).as_quat()
  return [float(w), float(x), float(y), float(z)]


def _rx(angle: float) -> np.ndarray:
  c, s = np.cos(angle), np.sin(angle)
  return np.array([[1, 0, 0], [0, c, -s], [0, s, c]], np.float64)


NUSC_VERSION = 'v1.0-mini'
NUSC_IMAGE_HW = (90, 160)
NUSC_INTRINSIC = [[100.0, 0.0, 80.0], [0.0, 100.0, 45.0], [0.0, 0.0, 1.0]]
# camera (x right, y down, z forward) -> ego (x forward, y left, z up), pitched 2 degrees down.
NUSC_EGO_FROM_CAMERA = _rigid(
    np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], np.float64) @ _rx(-0.035), [1.7, 0.05, 1.5])
NUSC_EGO_FROM_LIDAR = _rigid(_rz(-np.pi / 2), [0.9, 0.0, 1.8])
NUSC_GLOBAL_FROM_EGO_AT_LIDAR = _rigid(_rz(0.4), [600.0, 1200.0, 0.0])
# The camera fires 10 ms later: the car has moved 0.3 m and turned a little.
NUSC_GLOBAL_FROM_EGO_AT_CAMERA = _rigid(_rz(0.41), [600.0 + 0.3 * np.cos(0.4),
                                                    1200.0 + 0.3 * np.sin(0.4), 0.0])
# Lidarseg fine classes in index order, as in nuScenes-lidarseg's category.json.
NUSC_LIDARSEG_CATEGORIES = (
    'noise', 'animal', 'human.pedestrian.adult', 'human.pedestrian.child',
    'human.pedestrian.construction_worker', 'human.pedestrian.personal_mobility',
    'human.pedestrian.police_officer', 'human.pedestrian.stroller',
    'human.pedestrian.wheelchair', 'movable_object.barrier', 'movable_object.debris',
    'movable_object.pushable_pullable', 'movable_object.trafficcone',
    'static_object.bicycle_rack', 'vehicle.bicycle', 'vehicle.bus.bendy', 'vehicle.bus.rigid',
    'vehicle.car', 'vehicle.construction', 'vehicle.emergency.ambulance',
    'vehicle.emergency.police', 'vehicle.motorcycle', 'vehicle.trailer', 'vehicle.truck',
    'flat.driveable_surface', 'flat.other', 'flat.sidewalk', 'flat.terrain', 'static.manmade',
    'static.other', 'static.vegetation', 'vehicle.ego')
NUSC_ATTRIBUTES = ('cycle.with_rider', 'cycle.without_rider', 'vehicle.parked',
                   'pedestrian.moving')
# LiDAR points given in the CAMERA frame by OpenCV pixel (u, v) and depth, with a fine label.
NUSC_POINTS = [
    (100, 50, 20.0, 'vehicle.car'),
    (100, 50, 35.0, 'static.vegetation'),  # same ray, farther: loses the pixel
    (31, 71, 8.0, 'flat.driveable_surface'),
    (141, 21, 50.0, 'noise'),  # a depth return with an ignore label
    (61, 41, 0.6, 'vehicle.ego'),  # nearer than --min_depth: dropped
    (20, 20, -6.0, 'static.manmade'),  # behind the camera
]
# Boxes in the CAMERA frame, schema convention: category, attributes, (x, y, z), l, w, h, yaw.
NUSC_BOXES = [
    ('vehicle.car', ['vehicle.parked'], (2.0, 0.8, 15.0), 4.2, 1.8, 1.5, 0.3),
    ('human.pedestrian.adult', ['pedestrian.moving'], (-3.0, 0.9, 10.0), 0.7, 0.6, 1.75, -1.0),
    ('vehicle.bicycle', ['cycle.with_rider'], (4.0, 1.0, 12.0), 1.7, 0.6, 1.6, 1.2),
    ('vehicle.bicycle', ['cycle.without_rider'], (-4.0, 1.0, 12.0), 1.7, 0.6, 1.1, 0.0),
    ('movable_object.barrier', [], (0.5, 1.2, 9.0), 2.0, 0.4, 1.0, 0.0),
    ('vehicle.car', [], (0.0, 0.5, -10.0), 4.2, 1.8, 1.5, 0.0),  # behind the camera
    # At the left image edge: only its pitched true corners reach > 1 px into the stored image
    # (about 1.4 px at 45 x 80; the upright box of the same centre, size and yaw, 0.8 px).
    ('human.pedestrian.adult', [], (-8.48, 0.9, 10.0), 0.7, 0.6, 1.75, 0.0),
]
# (pitch, roll) in degrees of each box about its own width and length axes, applied after the
# yaw: tilts like those of real annotations relative to a camera (median ~1, up to ~4 degrees
# on a v1.0-trainval scene), some larger. They leave the schema yaw unchanged.
NUSC_BOX_TILTS_DEG = [(3.0, -2.0), (-1.5, 4.0), (6.0, 5.0), (0.0, 0.0), (0.0, 0.0), (0.0, 0.0),
                      (6.0, -3.0)]
# (scene name, log) in the devkit's official v1.0-mini split lists.
NUSC_SCENES = (('scene-0061', 'mini_train'), ('scene-0553', 'mini_train'),
               ('scene-0103', 'mini_val'))
NUSC_SAMPLES_PER_SCENE = 2


def nusc_camera_point(u: float, v: float, depth: float) -> np.ndarray:
  k = np.asarray(NUSC_INTRINSIC)
  return depth * np.array([(u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1], 1.0])


def _token(*parts) -> str:
  import hashlib  # pylint: disable=g-import-not-at-top
  return hashlib.md5('/'.join(map(str, parts)).encode()).hexdigest()


def _box_rotation_in_camera(yaw: float, pitch_deg: float = 0.0,
                            roll_deg: float = 0.0) -> np.ndarray:
  """nuScenes box axes (x length, y width/left, z up) expressed in our camera frame: upright
  at `yaw` about the camera's y axis, then pitched about the box's y and rolled about its x."""
  c, s = np.cos(yaw), np.sin(yaw)
  length, up = np.array([c, 0, -s]), np.array([0, -1.0, 0])
  upright = np.stack([length, np.cross(up, length), up], -1)
  pitch, roll = np.radians(pitch_deg), np.radians(roll_deg)
  about_y = np.array([[np.cos(pitch), 0, np.sin(pitch)], [0, 1, 0],
                      [-np.sin(pitch), 0, np.cos(pitch)]])
  return upright @ about_y @ _rx(roll)


def _write_json(path: str, payload) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(payload, f)


def write_nuscenes(root: str, with_lidarseg: bool = True) -> str:
  """A v1.0-mini-style dataroot that nuscenes.nuscenes.NuScenes(version, root) loads."""
  tables = {name: [] for name in ('category', 'attribute', 'visibility', 'instance', 'sensor',
                                  'calibrated_sensor', 'ego_pose', 'log', 'scene', 'sample',
                                  'sample_data', 'sample_annotation', 'map', 'lidarseg')}
  for index, name in enumerate(NUSC_LIDARSEG_CATEGORIES):
    tables['category'].append({'token': _token('category', name), 'name': name,
                               'description': name, 'index': index})
  for name in NUSC_ATTRIBUTES:
    tables['attribute'].append({'token': _token('attribute', name), 'name': name,
                                'description': name})
  for level in ('1', '2', '3', '4'):
    tables['visibility'].append({'token': level, 'level': f'v{level}', 'description': level})
  sensors = {'LIDAR_TOP': ('lidar', NUSC_EGO_FROM_LIDAR, []),
             'CAM_FRONT': ('camera', NUSC_EGO_FROM_CAMERA, NUSC_INTRINSIC)}
  for channel, (modality, pose, intrinsic) in sensors.items():
    tables['sensor'].append({'token': _token('sensor', channel), 'channel': channel,
                             'modality': modality})
    tables['calibrated_sensor'].append({
        'token': _token('calibrated', channel), 'sensor_token': _token('sensor', channel),
        'translation': pose[:3, 3].tolist(), 'rotation': _quaternion_wxyz(pose[:3, :3]),
        'camera_intrinsic': intrinsic})
  log_token = _token('log')
  tables['log'].append({'token': log_token, 'logfile': 'n008-fixture', 'vehicle': 'n008',
                        'date_captured': '2018-08-01', 'location': 'singapore-onenorth'})
  tables['map'].append({'token': _token('map'), 'log_tokens': [log_token],
                        'category': 'semantic_prior', 'filename': 'maps/fixture.png'})
  os.makedirs(os.path.join(root, 'maps'), exist_ok=True)
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(os.path.join(root, 'maps', 'fixture.png'))

  global_from_camera = NUSC_GLOBAL_FROM_EGO_AT_CAMERA @ NUSC_EGO_FROM_CAMERA
  lidar_from_camera = np.linalg.inv(NUSC_GLOBAL_FROM_EGO_AT_LIDAR @ NUSC_EGO_FROM_LIDAR) @ (
      global_from_camera)
  camera_points = np.stack([nusc_camera_point(u, v, d) for u, v, d, _ in NUSC_POINTS])
  lidar_points = camera_points @ lidar_from_camera[:3, :3].T + lidar_from_camera[:3, 3]
  cloud = np.zeros((len(lidar_points), 5), np.float32)
  cloud[:, :3] = lidar_points
  cloud[:, 4] = np.arange(len(lidar_points))  # ring index
  fine_labels = np.array([NUSC_LIDARSEG_CATEGORIES.index(p[3]) for p in NUSC_POINTS], np.uint8)
  h, w = NUSC_IMAGE_HW
  yy, xx = np.mgrid[0:h, 0:w]
  image = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 90)], -1).astype(np.uint8)

  for box_index, box in enumerate(NUSC_BOXES):
    tables['instance'].append({'token': _token('instance', box_index),
                               'category_token': _token('category', box[0]),
                               'nbr_annotations': 0, 'first_annotation_token': '',
                               'last_annotation_token': ''})
  timestamp = 1_533_000_000_000_000
  for scene_name, _ in NUSC_SCENES:
    scene_token = _token('scene', scene_name)
    samples = [_token('sample', scene_name, i) for i in range(NUSC_SAMPLES_PER_SCENE)]
    tables['scene'].append({'token': scene_token, 'log_token': log_token, 'name': scene_name,
                            'description': 'fixture', 'nbr_samples': len(samples),
                            'first_sample_token': samples[0], 'last_sample_token': samples[-1]})
    for i, sample_token in enumerate(samples):
      timestamp += 500_000
      tables['sample'].append({
          'token': sample_token, 'timestamp': timestamp, 'scene_token': scene_token,
          'prev': samples[i - 1] if i else '',
          'next': samples[i + 1] if i + 1 < len(samples) else ''})
      for channel, offset, pose in (('LIDAR_TOP', 0, NUSC_GLOBAL_FROM_EGO_AT_LIDAR),
                                    ('CAM_FRONT', 10_000, NUSC_GLOBAL_FROM_EGO_AT_CAMERA)):
        sd_token = _token('sample_data', scene_name, i, channel)
        ext = 'pcd.bin' if channel == 'LIDAR_TOP' else 'jpg'
        filename = f'samples/{channel}/n008-fixture__{channel}__{timestamp + offset}.{ext}'
        os.makedirs(os.path.join(root, 'samples', channel), exist_ok=True)
        if channel == 'LIDAR_TOP':
          cloud.tofile(os.path.join(root, filename))
          if with_lidarseg:
            label_token = _token('lidarseg', sd_token)
            label_file = f'lidarseg/{NUSC_VERSION}/{label_token}_lidarseg.bin'
            os.makedirs(os.path.join(root, 'lidarseg', NUSC_VERSION), exist_ok=True)
            fine_labels.tofile(os.path.join(root, label_file))
            tables['lidarseg'].append({'token': label_token, 'sample_data_token': sd_token,
                                       'filename': label_file})
        else:
          Image.fromarray(image).save(os.path.join(root, filename), quality=95)
        tables['ego_pose'].append({'token': _token('ego', sd_token),
                                   'timestamp': timestamp + offset,
                                   'rotation': _quaternion_wxyz(pose[:3, :3]),
                                   'translation': pose[:3, 3].tolist()})
        is_camera = channel == 'CAM_FRONT'
        tables['sample_data'].append({
            'token': sd_token, 'sample_token': sample_token,
            'ego_pose_token': _token('ego', sd_token),
            'calibrated_sensor_token': _token('calibrated', channel),
            'timestamp': timestamp + offset, 'fileformat': ext.split('.')[0],
            'is_key_frame': True, 'height': h if is_camera else 0,
            'width': w if is_camera else 0, 'filename': filename,
            'prev': _token('sample_data', scene_name, i - 1, channel) if i else '',
            'next': (_token('sample_data', scene_name, i + 1, channel)
                     if i + 1 < len(samples) else '')})
      for box_index, (category, attributes, center, length, width, height,
                      yaw) in enumerate(NUSC_BOXES):
        rotation = global_from_camera[:3, :3] @ _box_rotation_in_camera(
            yaw, *NUSC_BOX_TILTS_DEG[box_index])
        translation = global_from_camera[:3, :3] @ np.asarray(center) + global_from_camera[:3, 3]
        tables['sample_annotation'].append({
            'token': _token('annotation', sample_token, box_index),
            'sample_token': sample_token, 'instance_token': _token('instance', box_index),
            'visibility_token': '4',
            'attribute_tokens': [_token('attribute', a) for a in attributes],
            'translation': translation.tolist(), 'size': [width, length, height],
            'rotation': _quaternion_wxyz(rotation), 'prev': '', 'next': '',
            'num_lidar_pts': 3, 'num_radar_pts': 0})
  if not with_lidarseg:
    del tables['lidarseg']
  for name, rows in tables.items():
    _write_json(os.path.join(root, NUSC_VERSION, f'{name}.json'), rows)
  return root


# ---------------------------------------------------------------------------------------------
# FLIR ADAS v2

FLIR_RGB_HW = (72, 128)  # 16:9 like the BlackFly frames
FLIR_THERMAL_HW = (64, 80)  # 5:4 like the Tau 2's 512 x 640
FLIR_RGB_HFOV_DEG, FLIR_THERMAL_HFOV_DEG, FLIR_THERMAL_VFOV_DEG = 52.8, 45.0, 37.0
# (thermal video id, RGB video id): FLIR names each spectrum's videos independently.
FLIR_VIDEOS = (('4FRnNpmSmwktFJKjg', 'BzZspxAweF8AnKhWK'), ('6tLtjdkv5K5BuhB37',
                                                        'FkqCGijjAKpABetZZ'),
               ('vbrSzr4vFTm5QwuGH', 'PGdt7pJChnKoJDt35'))
FLIR_FRAMES = (0, 3)
# A warm object seen by both cameras, as the tangents (X / Z, Y / Z) of its direction.
FLIR_MARKER_DIRECTION = (0.1, -0.05)
FLIR_COCO_CATEGORIES = ((1, 'person'), (2, 'bike'), (3, 'car'), (17, 'dog'), (79, 'other vehicle'),
                        (90, 'face'))


def flir_pixel(direction, hw, hfov_deg, vfov_deg=None) -> tuple[float, float]:
  """Continuous pixel (u, v) (pixel centres at +0.5) of a direction in a centred camera."""
  h, w = hw
  fx = (w / 2) / np.tan(np.radians(hfov_deg) / 2)
  fy = fx if vfov_deg is None else (h / 2) / np.tan(np.radians(vfov_deg) / 2)
  return w / 2 + direction[0] * fx, h / 2 + direction[1] * fy


def _blob(hw, center, sigma, background, peak) -> np.ndarray:
  yy, xx = np.mgrid[0:hw[0], 0:hw[1]] + 0.5
  gauss = np.exp(-((xx - center[0])**2 + (yy - center[1])**2) / (2 * sigma**2))
  return background + (peak - background) * gauss


def flir_marker_boxes() -> list[tuple[str, list[float]]]:
  """COCO (category, [x, y, w, h]) annotations in thermal pixels of every fixture frame."""
  u, v = flir_pixel(FLIR_MARKER_DIRECTION, FLIR_THERMAL_HW, FLIR_THERMAL_HFOV_DEG,
                    FLIR_THERMAL_VFOV_DEG)
  return [('car', [u - 4, v - 3, 8, 6]),  # around the marker
          ('person', [0.5, 20, 10, 20]),  # straddles the left edge of the shared view: clipped
          ('dog', [75, 2, 4, 4]),  # outside the shared view: dropped
          ('face', [40, 40, 5, 5])]  # a category not kept


# 16-bit raw thermal (TLinear counts, 0.04 K each: 7400 ~ 296 K) of the analyticsData/ TIFFs.
FLIR_RAW_BACKGROUND, FLIR_RAW_PEAK = 7400, 7900
FLIR_JPEG_BACKGROUND, FLIR_JPEG_PEAK = 30, 240  # the post-processed 8-bit data/ JPEGs
FLIR_TIFF8_BACKGROUND = 50  # an analyticsData/ TIFF that holds 8-bit data (some in the release)


def flir_pair_names() -> list[tuple[str, str]]:
  """(RGB, thermal) data/ file names of every fixture pair, in writing order."""
  return [(f'video-{rgb_video}-frame-{frame:06d}-{_token(rgb_video, frame)[:17]}.jpg',
           f'video-{thermal_video}-frame-{frame:06d}-{_token(thermal_video, frame)[:17]}.jpg')
          for thermal_video, rgb_video in FLIR_VIDEOS for frame in FLIR_FRAMES]


def _conservator_index(dataset_id: str, names, annotations=None, analytics=()) -> dict:
  """index.json as Teledyne's Conservator writes it, limited to the keys public readers of the
  release use (datasetId; frames with datasetFrameId, videoMetadata.videoId/frameIndex, md5,
  analyticsMd5 when the raw frame exists, width/height, annotations with labels and
  boundingBox; videos with id and filename). The builder reads none of it."""
  frames, videos = [], {}
  for i, name in enumerate(names):
    _, video, _, frame, frame_id = os.path.splitext(name)[0].split('-')
    videos.setdefault(video, {'id': video, 'filename': f'{video}.zip'})
    entry = {'datasetFrameId': frame_id, 'md5': _token('md5', name),
             'videoMetadata': {'videoId': video, 'frameIndex': int(frame)},
             'annotations': [{'labels': [label], 'boundingBox': dict(zip('xywh', box))}
                             for label, box in (annotations or [])]}
    if i in analytics:
      entry['analyticsMd5'] = _token('analytics', name)
    frames.append(entry)
  return {'datasetId': dataset_id, 'frames': frames, 'videos': list(videos.values())}


def write_flir(root: str, eight_bit_tiffs: Sequence[int] = (),
               missing_tiffs: Sequence[int] = ()) -> str:
  """A FLIR_ADAS_v2 root in the release's layout: rgb_to_thermal_vid_map.json, video_rgb_test/
  {data/, coco.json, index.json} and video_thermal_test/{data/ (8-bit JPEGs), analyticsData/
  (16-bit TIFFs of the same stems), coco.json, index.json}. Pairs (flir_pair_names order) in
  eight_bit_tiffs get an 8-bit analyticsData/ TIFF, those in missing_tiffs none."""
  rgb_u, rgb_v = flir_pixel(FLIR_MARKER_DIRECTION, FLIR_RGB_HW, FLIR_RGB_HFOV_DEG)
  th_u, th_v = flir_pixel(FLIR_MARKER_DIRECTION, FLIR_THERMAL_HW, FLIR_THERMAL_HFOV_DEG,
                          FLIR_THERMAL_VFOV_DEG)
  rgb = np.clip(_blob(FLIR_RGB_HW, (rgb_u, rgb_v), 2.5, 40, 250), 0, 255).astype(np.uint8)
  rgb = np.repeat(rgb[..., None], 3, -1)
  blob = functools.partial(_blob, FLIR_THERMAL_HW, (th_u, th_v), 2.0)
  raw = np.round(blob(FLIR_RAW_BACKGROUND, FLIR_RAW_PEAK)).astype(np.uint16)
  jpeg = np.clip(blob(FLIR_JPEG_BACKGROUND, FLIR_JPEG_PEAK), 0, 255).astype(np.uint8)
  tiff8 = np.clip(blob(FLIR_TIFF8_BACKGROUND, FLIR_JPEG_PEAK), 0, 255).astype(np.uint8)
  categories = [{'id': i, 'name': n, 'supercategory': 'unknown'} for i, n in FLIR_COCO_CATEGORIES]
  cat_ids = {n: i for i, n in FLIR_COCO_CATEGORIES}
  thermal_dir, rgb_dir = os.path.join(root, 'video_thermal_test'), os.path.join(root,
                                                                                'video_rgb_test')
  for folder in (os.path.join(rgb_dir, 'data'), os.path.join(thermal_dir, 'data'),
                 os.path.join(thermal_dir, 'analyticsData')):
    os.makedirs(folder, exist_ok=True)
  pairs = flir_pair_names()
  images, annotations, analytics = [], [], []
  for index, (rgb_name, thermal_name) in enumerate(pairs):
    Image.fromarray(rgb).save(os.path.join(rgb_dir, 'data', rgb_name), quality=95)
    Image.fromarray(jpeg).save(os.path.join(thermal_dir, 'data', thermal_name), quality=95)
    if index not in missing_tiffs:
      analytics.append(index)
      Image.fromarray(tiff8 if index in eight_bit_tiffs else raw).save(os.path.join(
          thermal_dir, 'analyticsData', os.path.splitext(thermal_name)[0] + '.tiff'))
    video = thermal_name.split('-')[1]
    images.append({'id': index, 'file_name': f'data/{thermal_name}',
                   'height': FLIR_THERMAL_HW[0], 'width': FLIR_THERMAL_HW[1],
                   'extra_info': {'video_id': video}})
    for category, bbox in flir_marker_boxes():
      annotations.append({'id': len(annotations), 'image_id': index,
                          'category_id': cat_ids[category], 'bbox': bbox,
                          'area': bbox[2] * bbox[3], 'iscrowd': 0})
  _write_json(os.path.join(thermal_dir, 'coco.json'),
              {'images': images, 'annotations': annotations, 'categories': categories,
               'info': {'description': 'fixture'}, 'licenses': []})
  _write_json(os.path.join(rgb_dir, 'coco.json'),
              {'images': [], 'annotations': [], 'categories': categories})
  _write_json(os.path.join(thermal_dir, 'index.json'), _conservator_index(
      'thermalFixture', [t for _, t in pairs], flir_marker_boxes(), analytics))
  _write_json(os.path.join(rgb_dir, 'index.json'),
              _conservator_index('rgbFixture', [r for r, _ in pairs]))
  _write_json(os.path.join(root, 'rgb_to_thermal_vid_map.json'), dict(pairs))
  return root
