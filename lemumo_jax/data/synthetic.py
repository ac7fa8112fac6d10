"""Procedural driving scenes: the embedded default dataset (DESIGN.md section 4).

Each record is a pure function of (seed, split, index): a pinhole camera 1.5-2 m above a flat
ground plane looks down a (slightly curved) road with lane markings, sidewalks, buildings,
poles and trees, and 2-8 cars / pedestrians / cyclists modelled as oriented boxes, placed
4-30 m down the road by default (`object_range`; see OBJECT_RANGE for why). Every pixel
is ray cast in float64 numpy (ground plane + slab test in each box's local frame) to give the
depth target, segmentation and a shaded RGB image. The companion is either a simulated
multi-beam spinning LiDAR ray cast through the same scene and rendered with the shared
`geometry.render_depth` (paper section 3.2), or a thermal image.

Fusion has to matter, so RGB is made deliberately unreliable where the companion is not:
fog attenuates RGB with range (far objects vanish, LiDAR still returns them), objects carry a
random size scale (apparent size no longer gives depth), and global brightness varies down to
night-like scenes (LiDAR and thermal are unaffected).

Camera pitch is emulated by moving the principal point (the horizon row) rather than by
rotating the camera, so boxes stay exactly upright in the camera frame as the schema's
yaw-only boxes require.
"""

from __future__ import annotations

import types
import zlib
from typing import Any

import numpy as np

from lemumo_jax.data import geometry
from lemumo_jax.data import schema

SEG_CLASSES = ('road', 'sidewalk', 'ground', 'building', 'vegetation', 'pole', 'sky', 'car',
               'pedestrian', 'cyclist')
CLASSES_3D = schema.CLASSES_3D
CLASSES_2D = CLASSES_3D
COMPANIONS = ('depth', 'thermal')
MAX_DEPTH = 200.0  # metres; ground beyond this (near the horizon) is marked invalid (0)
LIDAR_NOISE_M = 0.02  # std of the simulated range noise
# Metres along the road. A 96 x 128 view with a ~140 px focal length shows a car at 30 m about
# 20 x 7 px (1 x 2 patches of 8 px); at 60 m it is under one patch, and a probe's object-depth
# error there (tens of percent at this size) puts every box metres outside the 0.5-4 m matching
# radii. The paper's 640 x 640 probe views resolve objects ~5x farther than these frames do.
OBJECT_RANGE = (4.0, 30.0)

_SEG = {name: i for i, name in enumerate(SEG_CLASSES)}
_OBJECT_DIMS = {'car': (4.5, 1.8, 1.5), 'pedestrian': (0.8, 0.8, 1.8),
                'cyclist': (1.8, 0.7, 1.7)}  # median (l, w, h); l runs along the heading
_CLASS_PROBS = (0.5, 0.3, 0.2)
_PLAIN, _BUILDING, _CAR, _PERSON = range(4)  # texture rule of a box surface
_GROUND, _SKY = -1, -2  # hit codes besides box indices
_CAR_PAINTS = np.array([[0.9, 0.9, 0.9], [0.08, 0.08, 0.09], [0.6, 0.62, 0.65],
                        [0.7, 0.1, 0.1], [0.1, 0.2, 0.6], [0.35, 0.36, 0.38], [0.8, 0.7, 0.2]])
_FACADES = np.array([[0.75, 0.68, 0.55], [0.6, 0.6, 0.62], [0.55, 0.3, 0.22],
                     [0.85, 0.85, 0.8], [0.45, 0.4, 0.35]])


class _Scene(types.SimpleNamespace):
  """Everything one record is rendered from (sampled by `_sample_scene`)."""


def _road_center(scene: _Scene, z: np.ndarray) -> np.ndarray:
  """x of the road's centre line at depth z: a parabola, so the road may curve."""
  return scene.road_x0 + scene.road_curve * z**2


def _road_frame(scene: _Scene, z: float) -> tuple[np.ndarray, np.ndarray, float]:
  """(centre-line point (x, z), unit normal pointing right (x, z), heading angle) at z."""
  theta = np.arctan(2 * scene.road_curve * z)
  return (np.array([_road_center(scene, z), z]), np.array([np.cos(theta), -np.sin(theta)]),
          theta)


def _sample_camera(rng: np.random.Generator, height: int, width: int) -> dict[str, Any]:
  focal = rng.uniform(0.9, 1.3) * width
  intrinsics = np.array([[focal, 0.0, width / 2 + rng.normal(0, 0.01 * width)],
                         [0.0, focal, height * (0.5 + rng.uniform(-0.12, 0.06))],
                         [0.0, 0.0, 1.0]])
  return {'intrinsics': intrinsics, 'cam_height': rng.uniform(1.5, 2.0),
          'lidar_origin': np.array([rng.uniform(-0.15, 0.15), -rng.uniform(0.2, 0.5),
                                    rng.uniform(-0.3, 0.2)])}


def _add_box(statics: list, box: tuple, seg: str, colour: np.ndarray, heat: float,
             kind: int = _PLAIN) -> None:
  statics.append((box, _SEG[seg], colour, heat, kind))


def _sample_roadside(rng: np.random.Generator, scene: _Scene) -> tuple[list, list]:
  """Buildings, poles and trees on both sides. Returns (boxes, bird's-eye obstacles)."""
  statics, obstacles = [], []
  ground_y = scene.cam_height
  for side in (-1.0, 1.0):
    urban = rng.random() < 0.75
    z = rng.uniform(-12.0, -6.0)
    while z < 150.0:
      frontage = rng.uniform(6.0, 20.0)
      # yaw = heading angle turns a box's width axis along the road (facade to the street).
      base, across, theta = _road_frame(scene, z + frontage / 2)
      curb = scene.road_half + scene.sidewalk
      if urban and rng.random() < 0.85:
        depth, tall = rng.uniform(8.0, 16.0), rng.uniform(4.0, 25.0)
        x, zz = base + side * (curb + rng.uniform(0.3, 4.0) + depth / 2) * across
        colour = _FACADES[rng.integers(len(_FACADES))] * rng.uniform(0.85, 1.15, 3)
        _add_box(statics, (x, ground_y - tall / 2, zz, depth, frontage, tall, theta),
                 'building', colour, rng.uniform(0.3, 0.4), _BUILDING)
      else:
        trunk_h, crown = rng.uniform(1.5, 3.0), rng.uniform(2.0, 4.5)
        x, zz = base + side * (curb + rng.uniform(0.5, 4.0)) * across
        green = np.array([0.2, 0.38, 0.15]) * rng.uniform(0.7, 1.3, 3)
        _add_box(statics, (x, ground_y - trunk_h / 2, zz, 0.35, 0.35, trunk_h, 0.0),
                 'vegetation', np.array([0.3, 0.22, 0.15]), 0.3)
        _add_box(statics, (x, ground_y - trunk_h - crown / 2, zz, crown, crown, crown,
                           rng.uniform(0, np.pi)), 'vegetation', green, 0.28)
        obstacles.append((x, zz, 0.3))
      z += frontage + (rng.uniform(0.5, 8.0) if rng.random() < 0.4 else 0.3)
    z = rng.uniform(2.0, 20.0)
    while z < 120.0:
      pole_h = rng.uniform(4.0, 7.0)
      base, across, _ = _road_frame(scene, z)
      x, zz = base + side * (scene.road_half + 0.4) * across
      _add_box(statics, (x, ground_y - pole_h / 2, zz, 0.22, 0.22, pole_h, 0.0), 'pole',
               np.array([0.45, 0.45, 0.47]), 0.33)
      obstacles.append((x, zz, 0.2))
      z += rng.uniform(12.0, 35.0)
  return statics, obstacles


def _sample_objects(rng: np.random.Generator, scene: _Scene, count: int,
                    obstacles: list, object_range: tuple[float, float]) -> list:
  """Up to `count` non-overlapping objects in view, as (box, class index); each is placed
  along the road at a distance drawn uniformly from object_range (metres)."""
  k = scene.intrinsics
  slope_lo, slope_hi = -k[0, 2] / k[0, 0] - 0.05, (scene.width - k[0, 2]) / k[0, 0] + 0.05
  objects = []
  for _ in range(count):
    for _ in range(30):  # rejection sampling against overlaps and the field of view
      cls = int(rng.choice(3, p=_CLASS_PROBS))
      # Random scale decouples apparent size from distance (fusion must matter).
      dims = np.array(_OBJECT_DIMS[CLASSES_3D[cls]]) * rng.uniform(0.6, 1.4) * rng.uniform(
          0.95, 1.05, 3)
      base, across, theta = _road_frame(scene, rng.uniform(*object_range))
      half, lanes, lane_w = scene.road_half, scene.lanes, 2 * scene.road_half / scene.lanes
      if cls == 0 and rng.random() < 0.15:  # parked at the curb
        offset = rng.choice([-1.0, 1.0]) * (half - dims[1] / 2 - 0.2)
      elif cls == 0:
        offset = -half + lane_w * (rng.integers(lanes) + 0.5) + rng.normal(0, 0.3)
      elif cls == 1 and rng.random() < 0.7:  # on a sidewalk
        offset = rng.choice([-1.0, 1.0]) * (half + rng.uniform(0.4, scene.sidewalk - 0.3))
      elif cls == 1:
        offset = rng.uniform(-half, half)
      else:
        offset = rng.choice([-1.0, 1.0]) * (half - rng.uniform(0.5, 1.5))
      # Right-hand traffic: right of centre heads away, left comes towards the camera.
      heading = theta - np.pi / 2 if offset > 0 else theta + np.pi / 2
      if cls == 1 or rng.random() < 0.2:
        yaw = rng.uniform(-np.pi, np.pi)
      else:
        yaw = heading + rng.normal(0, 0.08)
      x, z = base + offset * across
      radius = 0.5 * np.hypot(dims[0], dims[1])
      clear = all(np.hypot(x - ox, z - oz) > radius + r for ox, oz, r in obstacles)
      if clear and slope_lo <= x / z <= slope_hi:
        yaw = (yaw + np.pi) % (2 * np.pi) - np.pi
        objects.append(((x, scene.cam_height - dims[2] / 2, z, *dims, yaw), cls))
        obstacles.append((x, z, radius))
        break
  return objects


def _sample_scene(rng: np.random.Generator, height: int, width: int, fog_probability: float,
                  night_probability: float, num_objects: tuple[int, int],
                  object_range: tuple[float, float]) -> _Scene:
  scene = _Scene(height=height, width=width, **_sample_camera(rng, height, width))
  # Condition draws come first and unconditionally, so the scene content does not depend on
  # fog_probability / night_probability (the fog test renders one scene both ways).
  fog_draw, night_draw = rng.random(), rng.random()
  vanish = rng.uniform(25.0, 40.0)  # range where fog leaves 5% of the object's light
  scene.fog_beta = np.log(20.0) / vanish if fog_draw < fog_probability else 0.0
  scene.fog_colour = rng.uniform(0.7, 0.85) + rng.normal(0, 0.02, 3)
  night = night_draw < night_probability
  scene.brightness = rng.uniform(0.12, 0.35) if night else rng.uniform(0.6, 1.2)
  elevation, azimuth = rng.uniform(0.35, 1.2), rng.uniform(-np.pi, np.pi)
  scene.to_sun = np.array([np.cos(elevation) * np.sin(azimuth), -np.sin(elevation),
                           np.cos(elevation) * np.cos(azimuth)])
  scene.ambient = rng.uniform(0.35, 0.55)
  scene.sky_top = np.array([0.3, 0.5, 0.85]) * rng.uniform(0.8, 1.1, 3)
  scene.sky_horizon = np.array([0.78, 0.84, 0.92]) * rng.uniform(0.9, 1.05, 3)
  scene.lanes = int(rng.integers(2, 5))
  scene.road_half = scene.lanes * rng.uniform(3.0, 3.7) / 2
  scene.sidewalk = rng.uniform(1.5, 4.0)
  scene.road_x0 = rng.uniform(-2.0, 2.0)
  scene.road_curve = rng.uniform(-0.002, 0.002)
  scene.dash_phase = rng.uniform(0, 9.0)
  scene.asphalt = 0.3 * rng.uniform(0.8, 1.2) + rng.normal(0, 0.015, 3)
  scene.terrain = (np.array([0.35, 0.45, 0.22]) if rng.random() < 0.6
                   else np.array([0.5, 0.44, 0.34])) * rng.uniform(0.85, 1.15, 3)
  scene.road_heat = rng.uniform(0.48, 0.6)
  statics, obstacles = _sample_roadside(rng, scene)
  objects = _sample_objects(rng, scene, int(rng.integers(num_objects[0], num_objects[1] + 1)),
                            obstacles, object_range)
  scene.num_objects = len(objects)
  scene.object_cls = np.array([cls for _, cls in objects], np.int64)
  obj_colour, obj_heat, obj_kind = [], [], []
  for _, cls in objects:
    if cls == 0:
      obj_colour.append(_CAR_PAINTS[rng.integers(len(_CAR_PAINTS))]
                        * rng.uniform(0.85, 1.15, 3))
    else:
      obj_colour.append(rng.uniform(0.15, 0.9, 3))
    obj_heat.append(0.42 if cls == 0 else rng.uniform(0.78, 0.9))
    obj_kind.append(_CAR if cls == 0 else _PERSON)
  scene.boxes = np.array([box for box, _ in objects] + [s[0] for s in statics],
                         np.float64).reshape(-1, 7)
  scene.box_seg = np.array([_SEG[CLASSES_3D[cls]] for _, cls in objects]
                           + [s[1] for s in statics], np.int64)
  scene.box_colour = np.array(obj_colour + [s[2] for s in statics]).reshape(-1, 3)
  scene.box_heat = np.array(obj_heat + [s[3] for s in statics])
  scene.box_kind = np.array(obj_kind + [s[4] for s in statics], np.int64)
  return scene


def _cast_scene(scene: _Scene, origin: np.ndarray,
                dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Rays [P, 3] against boxes and ground: (t [P], hit [P] box index, _GROUND or _SKY)."""
  t, hit = geometry.intersect_boxes(origin, dirs, scene.boxes)
  with np.errstate(divide='ignore'):
    t_ground = np.where(dirs[:, 1] > 0, (scene.cam_height - origin[1]) / dirs[:, 1], np.inf)
  ground = t_ground < t
  t = np.where(ground, t_ground, t)
  hit = np.where(ground, _GROUND, np.where(np.isfinite(t), hit, _SKY))
  return t, hit


def _surface(scene: _Scene, points: np.ndarray, hit: np.ndarray) -> dict[str, np.ndarray]:
  """Attributes of the surface each ray hit at points [P, 3] (hit codes [P]).

  Returns seg [P], colour [P, 3] (unlit albedo), heat [P] (thermal, in [0, 1]) and the
  outward normal [P, 3] (zero for sky).
  """
  n = hit.shape[0]
  seg = np.full(n, _SEG['sky'], np.int64)
  colour = np.zeros((n, 3))
  heat = np.full(n, 0.05)
  normal = np.zeros((n, 3))
  on_ground = hit == _GROUND
  gx, gz = points[on_ground, 0], points[on_ground, 2]
  across = np.abs(gx - _road_center(scene, gz))
  road = across < scene.road_half
  walk = ~road & (across < scene.road_half + scene.sidewalk)
  seg[on_ground] = np.where(road, _SEG['road'], np.where(walk, _SEG['sidewalk'],
                                                         _SEG['ground']))
  lane_w = 2 * scene.road_half / scene.lanes
  lanes_from_left = (gx - _road_center(scene, gz) + scene.road_half) / lane_w
  nearest = np.round(lanes_from_left)
  divider = ((np.abs(lanes_from_left - nearest) * lane_w < 0.08) & (nearest > 0)
             & (nearest < scene.lanes) & (((gz + scene.dash_phase) % 9.0) < 3.0))
  edge_line = np.abs(across - (scene.road_half - 0.3)) < 0.08
  marking = road & (divider | edge_line)
  colour[on_ground] = np.where(marking[:, None], 0.85, np.where(
      road[:, None], scene.asphalt, np.where(walk[:, None], 0.58, scene.terrain)))
  heat[on_ground] = np.where(road, scene.road_heat, np.where(walk, 0.45, 0.36))
  normal[on_ground] = (0.0, -1.0, 0.0)

  on_box = hit >= 0
  ids = hit[on_box]
  boxes = scene.boxes[ids]
  rotations = geometry.rotation_y(boxes[:, 6])
  local = np.einsum('pji,pj->pi', rotations, points[on_box] - boxes[:, :3])
  halves = boxes[:, [3, 5, 4]] / 2
  axis = np.argmax(np.abs(local) / halves, 1)
  normal_local = np.zeros_like(local)
  rows = np.arange(ids.size)
  normal_local[rows, axis] = np.sign(local[rows, axis])
  normal[on_box] = np.einsum('pij,pj->pi', rotations, normal_local)
  seg[on_box] = scene.box_seg[ids]
  box_colour = scene.box_colour[ids].copy()
  box_heat = scene.box_heat[ids].copy()
  kind = scene.box_kind[ids]
  # Facade windows on a 2.2 m x 3 m grid; warmer than the wall (heated interiors).
  along = np.where(axis == 0, local[:, 2], local[:, 0])
  window = ((kind == _BUILDING) & (axis != 1) & ((along / 2.2) % 1.0 > 0.3)
            & ((along / 2.2) % 1.0 < 0.75) & ((local[:, 1] / 3.0) % 1.0 > 0.3)
            & ((local[:, 1] / 3.0) % 1.0 < 0.75))
  box_colour[window] = (0.2, 0.25, 0.32)
  box_heat[window] += 0.08
  # Cars: glass band in the upper part, engine heat in the front quarter (+local x).
  upper = local[:, 1] < -halves[:, 1] / 3
  box_colour[(kind == _CAR) & upper & (axis != 1)] = (0.12, 0.15, 0.2)
  box_heat[(kind == _CAR) & (local[:, 0] > halves[:, 0] / 2)] = 0.9
  # People: dark trousers below the waist, warmest at the head.
  box_colour[(kind == _PERSON) & (local[:, 1] > 0)] = (0.15, 0.15, 0.2)
  box_heat[(kind == _PERSON) & (local[:, 1] < -0.6 * halves[:, 1])] += 0.08
  colour[on_box] = box_colour
  heat[on_box] = box_heat
  return {'seg': seg, 'colour': colour, 'heat': heat, 'normal': normal}


def _blur3(image: np.ndarray) -> np.ndarray:
  """Separable [1, 2, 1] / 4 blur with edge replication. [H, W] -> [H, W]."""
  padded = np.pad(image, 1, mode='edge')
  rows = (padded[:-2] + 2 * padded[1:-1] + padded[2:]) / 4
  return (rows[:, :-2] + 2 * rows[:, 1:-1] + rows[:, 2:]) / 4


def _lidar_companion(rng: np.random.Generator, scene: _Scene, beams: int,
                     step_deg: float) -> tuple[np.ndarray, np.ndarray]:
  """Spinning LiDAR over the camera's field of view -> (companion [H, W], points [P, 3])."""
  k = scene.intrinsics
  margin = np.deg2rad(2.0)
  az_lo = np.arctan(-k[0, 2] / k[0, 0]) - margin
  az_hi = np.arctan((scene.width - k[0, 2]) / k[0, 0]) + margin
  azimuth = np.arange(az_lo, az_hi, np.deg2rad(step_deg))
  elevation = np.deg2rad(np.linspace(-25.0, 3.0, beams))
  el, az = np.meshgrid(elevation, azimuth, indexing='ij')
  dirs = np.stack([np.cos(el) * np.sin(az), -np.sin(el), np.cos(el) * np.cos(az)],
                  -1).reshape(-1, 3)
  t, _ = _cast_scene(scene, scene.lidar_origin, dirs)
  ranges = t + rng.normal(0.0, LIDAR_NOISE_M, t.shape)
  keep = np.isfinite(t) & (ranges < schema.R_MAX) & (rng.random(t.shape) > 0.05)
  points = scene.lidar_origin + ranges[keep, None] * dirs[keep]
  companion, _ = geometry.render_depth(points, k, scene.height, scene.width)
  return companion, points


class SyntheticScenes:
  """Grain-compatible random-access source of procedural driving records (schema.py)."""

  def __init__(self, num_records: int, height: int = 96, width: int = 128,
               companion: str = 'depth', seed: int = 0, split: str = 'train',
               lidar_beams: int = 32, fog_probability: float = 0.5,
               night_probability: float = 0.25, num_objects: tuple[int, int] = (2, 8),
               lidar_azimuth_step_deg: float = 0.4, min_visible_pixels: int = 4,
               object_range: tuple[float, float] = OBJECT_RANGE):
    if companion not in COMPANIONS:
      raise ValueError(f'companion must be one of {COMPANIONS}, got {companion!r}')
    if num_records < 0 or height < 8 or width < 8 or seed < 0:
      raise ValueError(f'bad SyntheticScenes sizes: num_records={num_records}, '
                       f'height={height}, width={width}, seed={seed}')
    if not 1 <= num_objects[0] <= num_objects[1]:
      raise ValueError(f'num_objects must be (lo, hi) with 1 <= lo <= hi, got {num_objects}')
    self.num_records, self.height, self.width = int(num_records), int(height), int(width)
    self.companion, self.seed, self.split = companion, int(seed), split
    self.lidar_beams, self.lidar_azimuth_step_deg = int(lidar_beams), lidar_azimuth_step_deg
    self.fog_probability, self.night_probability = fog_probability, night_probability
    self.num_objects = (int(num_objects[0]), int(num_objects[1]))
    self.min_visible_pixels = min_visible_pixels
    if not 1.0 <= object_range[0] < object_range[1]:
      raise ValueError(f'object_range must be (near, far) metres with 1 <= near < far, got '
                       f'{object_range}')
    self.object_range = (float(object_range[0]), float(object_range[1]))
    # crc32, not hash(): Python salts str hashes per process, grain workers must agree.
    self._split_key = zlib.crc32(split.encode('utf-8'))
    rows, cols = np.mgrid[0:self.height, 0:self.width].astype(np.float64)
    self._pixel_centres = (cols.ravel() + 0.5, rows.ravel() + 0.5)  # (u, v) [H*W] each

  def __len__(self) -> int:
    return self.num_records

  def __repr__(self) -> str:
    return (f'SyntheticScenes({self.num_records}, {self.height}x{self.width}, '
            f'{self.companion}, seed={self.seed}, split={self.split!r})')

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.render(index)[0]

  def render(self, index: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Record `index` plus what tests and debugging need besides it.

    Returns (record, extras); extras: instance [H, W] int32 (index into the record's boxes,
    -1 elsewhere), fog_beta (0 = clear), brightness, scene (the sampled _Scene) and, in
    depth mode, lidar_points [P, 3] in the camera frame.
    """
    index = int(index)
    if not 0 <= index < self.num_records:
      raise IndexError(f'index {index} out of range for {self!r}')
    rng = np.random.default_rng(np.random.SeedSequence([self.seed, self._split_key, index]))
    h, w = self.height, self.width
    scene = _sample_scene(rng, h, w, self.fog_probability, self.night_probability,
                          self.num_objects, self.object_range)
    k = scene.intrinsics
    u, v = self._pixel_centres
    dirs = np.stack([(u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1], np.ones_like(u)], -1)
    origin = np.zeros(3)
    t, hit = _cast_scene(scene, origin, dirs)
    points = dirs * np.where(np.isfinite(t), t, 0.0)[:, None]
    surface = _surface(scene, points, hit)

    lambert = np.clip(surface['normal'] @ scene.to_sun, 0.0, None)
    texture = 1.0 + rng.normal(0.0, 0.06, hit.shape)
    lit = surface['colour'] * ((scene.ambient + (1 - scene.ambient) * lambert) * texture)[:, None]
    sky = hit == _SKY
    up = np.clip(-dirs[sky, 1] / np.linalg.norm(dirs[sky], axis=1) * 3.0, 0.0, 1.0)
    lit[sky] = scene.sky_horizon + up[:, None] * (scene.sky_top - scene.sky_horizon)
    ranges = t * np.linalg.norm(dirs, axis=1)  # inf for sky: pure fog colour
    transmission = np.exp(-scene.fog_beta * ranges)[:, None] if scene.fog_beta else 1.0
    rgb = scene.brightness * (transmission * lit + (1 - transmission) * scene.fog_colour)
    rgb = rgb + rng.normal(0.0, 0.015, rgb.shape)  # sensor noise: dominates at night
    rgb = np.round(np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8).reshape(h, w, 3)

    depth = np.where(np.isfinite(t) & (t <= MAX_DEPTH), t, 0.0).reshape(h, w)
    extras: dict[str, Any] = {'fog_beta': scene.fog_beta, 'brightness': scene.brightness,
                              'scene': scene}
    if self.companion == 'depth':
      companion, extras['lidar_points'] = _lidar_companion(
          rng, scene, self.lidar_beams, self.lidar_azimuth_step_deg)
    else:
      thermal = surface['heat'].reshape(h, w) + rng.normal(0.0, 0.015, (h, w))
      companion = np.clip(_blur3(thermal), 0.0, 1.0).astype(np.float32)

    # Label objects seen by at least a few pixels whose box lies fully in front of the camera.
    n_obj = scene.num_objects
    visible = np.bincount(hit[(hit >= 0) & (hit < n_obj)], minlength=n_obj)
    boxes2d, in_front = geometry.boxes3d_to_2d(scene.boxes[:n_obj], k, h, w)
    labelled = np.flatnonzero((visible >= self.min_visible_pixels) & in_front)
    relabel = np.full(scene.boxes.shape[0] + 2, -1, np.int32)  # slots -2, -1: sky, ground
    relabel[labelled] = np.arange(labelled.size)
    extras['instance'] = relabel[hit].reshape(h, w)
    record = {
        'rgb': rgb,
        'companion': companion,
        'depth_target': depth.astype(np.float32),
        'seg': surface['seg'].astype(np.uint8).reshape(h, w),
        'boxes3d': scene.boxes[labelled].astype(np.float32).reshape(-1, 7),
        'boxes3d_cls': scene.object_cls[labelled].astype(np.int32),
        'boxes2d': boxes2d[labelled].astype(np.float32).reshape(-1, 4),
        'boxes2d_cls': scene.object_cls[labelled].astype(np.int32),
        'intrinsics': k.astype(np.float32),
        'meta': {'dataset': 'synthetic', 'scene': f'{self.split}-{index}', 'frame': index,
                 'camera': 'FRONT', 'timestamp': index},
    }
    return record, extras


def metadata(num_train: int, num_val: int = 0, height: int = 96, width: int = 128,
             companion: str = 'depth') -> dict[str, Any]:
  """What sources.dataset_metadata returns for a built dataset, for the synthetic scenes."""
  if companion not in COMPANIONS:
    raise ValueError(f'companion must be one of {COMPANIONS}, got {companion!r}')
  return {'dataset': 'synthetic', 'splits': {'train': int(num_train), 'val': int(num_val)},
          'classes_3d': list(CLASSES_3D), 'classes_2d': list(CLASSES_2D),
          'seg_classes': list(SEG_CLASSES), 'companion': companion,
          'image_size': [int(height), int(width)]}
