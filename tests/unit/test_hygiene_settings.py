"""Settings for the datasets' trust boundary and for what the agent leaves on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConfigError, Settings, child_environment


def test_dataset_roots_and_buckets_are_lists() -> None:
    settings = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://db/x",
            "DATASET_ROOT": "/mnt/d/datasets",
            "ALLOWED_DATASET_ROOTS": "/srv/shared:/mnt/d/datasets",
            "ALLOWED_DATASET_BUCKETS": "team-a, team-b",
        }
    )
    assert settings.dataset_roots == (Path("/mnt/d/datasets"), Path("/srv/shared"))
    assert settings.dataset_buckets == ("datasets", "team-a", "team-b")
    assert settings.allow_private_dataset_urls is False
    with pytest.raises(ConfigError, match="ALLOWED_DATASET_ROOTS"):
        Settings.from_env({"ALLOWED_DATASET_ROOTS": "relative/folder"})


def test_every_tool_cache_of_the_trainer_is_under_data_dir(tmp_path: Path) -> None:
    env = child_environment(Settings(data_dir=tmp_path / "data"), offline=True)
    for name in ("MPLCONFIGDIR", "YOLO_CONFIG_DIR", "TORCH_HOME"):
        assert Path(env[name]).is_relative_to(tmp_path / "data"), name
