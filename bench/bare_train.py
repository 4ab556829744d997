"""A bare Ultralytics training, for bench/overhead.py: `YOLO(model).train(**arguments)`, nothing else.

python bench/bare_train.py MODEL ARGUMENTS_JSON
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    model, arguments = sys.argv[1], json.loads(sys.argv[2])
    from ultralytics import YOLO

    YOLO(model).train(**arguments)
    return 0


if __name__ == "__main__":
    sys.exit(main())
