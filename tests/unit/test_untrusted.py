"""A row is untrusted: bounded JSON, model names, number forms, short redacted messages."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from agent.config import ConfigError, Settings
from agent.domain.errors import InvalidRequest
from agent.domain.redact import MAX_MESSAGE_CHARS, MAX_VALUE_CHARS, error_message, redact, register_secret
from agent.domain.request import parse_request
from agent.domain.run import RunRow
from agent.domain.status import RunStatus
from agent.domain.untrusted import MAX_JSON_DEPTH, Unreadable, load_json
from agent.wiring import agent_secret


def row(configuration: Any = None, **cols: Any) -> RunRow:
    cols.setdefault("data_yaml", "/data/d.yaml")
    return RunRow(id="r1", status=RunStatus.QUEUED, configuration=configuration, **cols)


def refusal(configuration: Any = None, **cols: Any) -> str:
    with pytest.raises(InvalidRequest) as err:
        parse_request(row(configuration, **cols))
    message = str(err.value)
    assert len(message) <= 400, message
    return message


@pytest.mark.parametrize(
    "raw",
    [
        "[" * 5000 + "]" * 5000,
        '{"a":' * 3000 + "1" + "}" * 3000,
        json.dumps({"k": "x" * 70_000}),
        json.dumps({str(i): i for i in range(3000)}),
        '{"epochs": 1' + "0" * 5000 + "}",
        '{"epochs": ' + "9" * 400 + "}",
        "{epochs: 3",
    ],
)
def test_load_json_never_raises_and_refuses_what_is_over_a_limit(raw: str) -> None:
    value = load_json(raw)
    if isinstance(value, dict):  # big integers are read as infinite, and refused by range checks
        assert value["epochs"] == float("inf")
        assert "finite" in refusal(raw)
    else:
        assert isinstance(value, Unreadable)
        assert "configuration" in refusal(value)


def test_depth_limit_applies_to_decoded_configurations_too() -> None:
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(MAX_JSON_DEPTH + 2):
        node["a"] = {}
        node = node["a"]
    assert "levels deep" in refusal(deep)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"epochs": 1e300}, "between"),
        ({"epochs": 10**25}, "out of range"),
        ({"epochs": 10**400}, "too large to read (at epochs)"),
        ({"epochs": -0}, "between"),
        ({"learningRate": -0.0}, "learningRate"),
        ({"epochs": True}, "boolean"),
        ({"epochs": "NaN"}, "finite"),
        ({"epochs": "1e400"}, "finite"),
        ({"epochs": "9" * 500}, "must be a number"),
        ({"epochs": "9" * 5000}, "(at epochs)"),
        ({"batchSize": float("nan")}, "finite"),
        ({"imgSize": [640]}, "imgSize"),
    ],
)
def test_numbers_in_any_json_form_are_range_checked(config: dict[str, Any], expected: str) -> None:
    assert expected in refusal(config)


@pytest.mark.parametrize(
    ("base_model", "expected"),
    [
        ("/etc/passwd.pt", "not a path"),
        ("../../cache/datasets/x/data.yaml", "not a path"),
        ("..evil.pt", "'..'"),
        ("https://example.com/model.pt", "URL"),
        ("storage:models/x.pt", "URL"),
        ("file:///tmp/x.pt", "URL"),
        ("sub\\model.pt", "not a path"),
        ("~/model.pt", "not a path"),
        ("model.pkl", "unknown model"),
        ("YOLOv9z", "unknown model"),
        ("m" * 100_000 + ".pt", "unknown model"),
        ("mödel.pt", "unknown model"),
        ("model.pt\x00.yaml", "unknown model"),
    ],
)
def test_base_model_is_a_known_name_or_a_plain_file_name(base_model: str, expected: str) -> None:
    message = refusal(base_model=base_model)
    assert "base_model" in message and expected in message
    assert len(message) < 600


@pytest.mark.parametrize("name", ["YOLOv8n", "yolov8x-seg", "YOLO11m", "best.pt", "custom-v2.yaml"])
def test_accepted_model_names(name: str) -> None:
    assert parse_request(row(base_model=name)).base_model == name


def test_long_and_odd_strings_are_refused_quoted_short() -> None:
    message = refusal(data_yaml="d" * 100_000)
    assert "data_yaml" in message and len(message) < 400
    assert "NUL" in refusal(data_yaml="a\x00b")
    assert "(at optimizer)" in refusal({"optimizer": "🚀" * 10_000})
    assert "optimizer" in refusal({"optimizer": "🚀" * 1_000})


def test_redact_masks_url_passwords_tokens_keys_and_registered_secrets() -> None:
    register_secret("sk-verysecretvalue")
    text = (
        "postgresql://agent:hunter2pass@db.example.com:5432/app "
        "postgres//agent:otherpass@host/db "
        "https://x.supabase.co/storage/v1/object/sign/b/k?token=abc.def.ghi&download= "
        "key=sk-verysecretvalue eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoic2VydmljZV9yb2xlIn0.c2lnbmF0dXJl"
    )
    out = redact(text)
    for secret in ("hunter2pass", "otherpass", "abc.def.ghi", "sk-verysecretvalue", "eyJhbGci"):
        assert secret not in out
    assert "postgresql://agent:***@db.example.com:5432/app" in out


def test_error_message_has_no_frames_and_is_capped() -> None:
    text = 'Traceback (most recent call last):\n  File "x.py", line 3, in f\nValueError: bad\n' + "y" * 9000
    message = error_message(text)
    assert "Traceback" not in message and 'File "' not in message
    assert len(message) <= MAX_MESSAGE_CHARS and message.startswith("ValueError: bad")
    assert MAX_VALUE_CHARS == 200


def test_fake_trainer_defaults_by_backend_and_settings_hold_no_clear_secret() -> None:
    assert Settings().fake_trainer_allowed
    assert not Settings(database_url="postgresql://u:p4ssw0rd@h/db").fake_trainer_allowed
    assert Settings(database_url="postgresql://h/db", allow_fake_trainer=True).fake_trainer_allowed
    assert "p4ssw0rd" not in redact("connect to postgresql://u:p4ssw0rd@h/db failed: p4ssw0rd")
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"SUPABASE_URL": "not a url:sekr1tpw@", "SUPABASE_SERVICE_ROLE_KEY": "k" * 20})
    assert "sekr1tpw" not in str(err.value) and "SUPABASE_URL" in str(err.value)


def test_the_embedded_backend_generates_its_agent_secret_once_private(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    key = agent_secret(settings)
    assert key is not None and len(key) >= 32 and agent_secret(settings) == key
    assert stat.S_IMODE(settings.agent_secret_file.stat().st_mode) == 0o600
    assert agent_secret(Settings(data_dir=tmp_path, agent_secret="s" * 20)) == b"s" * 20
    assert agent_secret(Settings(data_dir=tmp_path / "pg", database_url="postgresql://h/db")) is None
    assert key.decode() not in redact(f"key {key.decode()}")
