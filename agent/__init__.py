"""saturnos-agent: claims training_runs rows and trains Ultralytics YOLO models."""

__version__ = "0.1.0"
