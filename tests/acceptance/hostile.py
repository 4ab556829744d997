"""A corpus of hostile rows (the row, its numbers, its strings, its model), and what each must end as.

Written as a user holding the web app's public key could write them: straight into
`training_runs`. Shared by the corpus tests of both backends.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

MESSAGE_CAP = 2000
FRAME = re.compile(r'Traceback \(most recent call last\)|File "[^"]*", line \d+')
FAKE = {"trainer": "fake", "epochs": 2, "fakeEpochSeconds": 0.0, "fakeBatches": 1}


@dataclass(frozen=True)
class Case:
    name: str
    expect: str  # a fragment the error message must contain
    configuration: str | None  # raw JSON text, as the app (or anyone) could store it
    data_yaml: str | None = "fake.yaml"
    base_model: str | None = None


def _cfg(**extra: Any) -> str:
    return json.dumps({**FAKE, **extra})


def _nested(levels: int) -> dict[str, Any]:
    node: dict[str, Any] = {}
    root = node
    for _ in range(levels):
        node["a"] = {}
        node = node["a"]
    return root


def corpus(dataset_yaml: Path) -> list[Case]:
    """The rows; model cases use a real dataset so that they reach model resolution."""
    real = str(dataset_yaml)
    ultra = json.dumps({"epochs": 1, "imgSize": 64, "device": "cpu", "task": "detect"})
    deep_array = "[" * 3000 + "]" * 3000
    deep_object = '{"a":' * 3000 + "1" + "}" * 3000
    return [
        # Shape of the JSON as a whole.
        Case("deep array", "configuration", deep_array),
        Case("deep object", "configuration", deep_object),
        Case("deep inside a valid request", "levels deep", _cfg(augmentation=_nested(40))),
        Case("huge configuration", "bytes of JSON", _cfg(junk="x" * 200_000)),
        # Over Realtime's 1 MB record: the INSERT event comes cut (Error 413), without the row to
        # decide a claim on, so the agent reads the row instead.
        Case("configuration over Realtime's record size", "bytes of JSON", _cfg(junk="x" * 1_100_000)),
        Case("thousands of keys", "keys and items", json.dumps({f"k{i}": i for i in range(3000)})),
        Case("json string holding deep json", "configuration", json.dumps(deep_array)),
        Case("not an object", "JSON object", json.dumps("just a string")),
        Case("an array", "JSON object", "[1, 2, 3]"),
        # Numbers in every JSON form.
        Case("epochs 1e400", "finite", '{"trainer": "fake", "epochs": 1e400}'),
        Case("epochs 5000 digits", "epochs", '{"trainer": "fake", "epochs": 1' + "0" * 5000 + "}"),
        Case("epochs -0", "between", '{"trainer": "fake", "epochs": -0}'),
        Case("epochs true", "boolean", '{"trainer": "fake", "epochs": true}'),
        Case("epochs 2.5", "whole number", '{"trainer": "fake", "epochs": 2.5}'),
        Case("learningRate 1e-400", "learningRate", '{"trainer": "fake", "learningRate": 1e-400}'),
        Case("batchSize NaN string", "finite", _cfg(batchSize="NaN")),
        Case("imgSize a list", "imgSize", _cfg(imgSize=[640])),
        Case("augmentation 1e400", "finite", '{"trainer": "fake", "augmentation": {"fliplr": 1e400}}'),
        # Device requests: never more slots than a host has, never a huge string or number.
        Case("gpuCount a billion", "gpuCount", _cfg(gpuCount=10**9)),
        Case("device list of 1500 GPUs", "GPUs", _cfg(device=list(range(1500)))),
        Case("device huge integer", "device", '{"trainer": "fake", "device": 1' + "0" * 400 + "}"),
        Case("device string of 3000 indexes", "device", _cfg(device="0," * 3000 + "0")),
        # Strings: unicode, long ones, odd ones.
        Case("unicode task", "task", _cfg(task="dé\u202etect🚀\u0301")),
        Case("long optimizer", "optimizer", _cfg(optimizer="A" * 10_000)),
        Case("long data_yaml", "data_yaml", _cfg(), data_yaml="d" * 100_000),
        Case("unknown trainer", "trainer", _cfg(trainer="../../bin/sh")),
        # Models: names and paths.
        Case("long base_model", "base_model", ultra, real, "m" * 100_000 + ".pt"),
        Case("absolute model path", "base_model", ultra, real, "/etc/passwd"),
        Case("model path with ..", "base_model", ultra, real, "../../cache/datasets/data.yaml"),
        Case("model URL", "base_model", ultra, real, "https://example.invalid/evil.pt"),
        Case("model storage URI", "base_model", ultra, real, "storage:datasets/evil.pt"),
        Case("model windows path", "base_model", ultra, real, "..\\..\\evil.pt"),
        Case("unicode model name", "base_model", ultra, real, "modèle🚀.pt"),
        Case("model yaml from the row", "ALLOW_ROW_MODEL_YAML", ultra, real, "evil.yaml"),
        Case("pt not in WEIGHTS_DIR", "WEIGHTS_DIR", ultra, real, "outside.pt"),
        Case("model name in configuration", "base_model", json.dumps({"baseModel": "/tmp/x.pt"}), real),
    ]


def insert(database_url: str, case: Case) -> str:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "insert into training_runs (data_yaml, base_model, configuration) values (%s, %s, %s::jsonb)"
            " returning id",
            (case.data_yaml, case.base_model, case.configuration),
        ).fetchone()
    assert row is not None
    return str(row[0])


def insert_valid(database_url: str) -> str:
    return insert(database_url, Case("valid", "", _cfg()))


def rows(database_url: str, ids: list[str]) -> dict[str, dict[str, Any]]:
    with psycopg.connect(database_url) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        found = cur.execute(
            "select id::text, status, attempt, error_message, worker_id from training_runs"
            " where id = any(%s::uuid[])",
            (ids,),
        ).fetchall()
    return {r["id"]: dict(r) for r in found}


def finished(database_url: str, ids: list[str]) -> dict[str, dict[str, Any]] | None:
    found = rows(database_url, ids)
    done = all(r["status"] in ("completed", "failed", "canceled") for r in found.values())
    return found if done and len(found) == len(ids) else None


def check_message(case: Case, message: str | None, secrets: tuple[str, ...] = ()) -> None:
    assert message, case.name
    assert len(message) <= MESSAGE_CAP, (case.name, len(message))
    assert not FRAME.search(message), (case.name, message)
    assert "\n" not in message, (case.name, message)
    assert case.expect in message, (case.name, message)
    for secret in secrets:
        assert secret not in message, case.name
