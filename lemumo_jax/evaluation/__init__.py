"""Probe evaluation: metrics (numpy, checked against nuscenes-devkit and pycocotools) and the
CenterNet target encoding / decoding of the detection probes."""
