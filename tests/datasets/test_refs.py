from __future__ import annotations

from pathlib import Path

import pytest

from agent.datasets import HttpRef, LocalRef, StorageRef, normalize_url, parse_dataset_ref
from agent.domain.errors import DatasetError


def test_absolute_path_is_local(tmp_path: Path) -> None:
    assert parse_dataset_ref("  /mnt/d/datasets/p/data.yaml ", None) == LocalRef(
        Path("/mnt/d/datasets/p/data.yaml")
    )


def test_relative_path_resolves_under_dataset_root() -> None:
    ref = parse_dataset_ref("proj/./data.yaml", Path("/data"))
    assert ref == LocalRef(Path("/data/proj/data.yaml"))


@pytest.mark.parametrize("value", ["../etc/data.yaml", "proj/../../x.yaml"])
def test_relative_path_may_not_leave_dataset_root(value: str) -> None:
    with pytest.raises(DatasetError, match="outside DATASET_ROOT"):
        parse_dataset_ref(value, Path("/data"))


def test_relative_path_needs_dataset_root() -> None:
    with pytest.raises(DatasetError, match="DATASET_ROOT is not set"):
        parse_dataset_ref("proj/data.yaml", None)


def test_file_url_is_local() -> None:
    assert parse_dataset_ref("file:///srv/my%20data/data.yaml", None) == LocalRef(
        Path("/srv/my data/data.yaml")
    )


def test_http_url() -> None:
    ref = parse_dataset_ref("https://host.example/sets/p/data.yaml?token=secret", None)
    assert isinstance(ref, HttpRef)
    assert ref.folder_url == "https://host.example/sets/p/"
    assert ref.yaml_name == "data.yaml"
    assert ref.display == "https://host.example/sets/p/data.yaml"
    assert "secret" not in ref.cache_key


def test_http_url_must_name_a_file() -> None:
    with pytest.raises(DatasetError, match="must name the YAML file"):
        parse_dataset_ref("http://host.example/sets/p/", None)


def test_unsupported_scheme() -> None:
    with pytest.raises(DatasetError, match="unsupported dataset URL scheme"):
        parse_dataset_ref("s3://bucket/data.yaml", None)


def test_storage_uri() -> None:
    ref = parse_dataset_ref("storage:datasets/my_project/data.yaml", None)
    assert ref == StorageRef("datasets", "my_project/data.yaml", "uri")
    assert ref.folder == "my_project"
    assert ref.yaml_name == "data.yaml"


def test_storage_uri_without_bucket_uses_the_default_bucket() -> None:
    assert parse_dataset_ref("storage:data.yaml", None, default_bucket="sets") == StorageRef(
        "sets", "data.yaml", "uri"
    )


def test_storage_uri_may_not_climb_out() -> None:
    with pytest.raises(DatasetError, match="outside"):
        parse_dataset_ref("storage:datasets/../../etc/data.yaml", None)


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("https://abc.supabase.co/storage/v1/object/public/datasets/p/my%20set/data.yaml", "public"),
        ("https://abc.supabase.co/storage/v1/object/sign/datasets/p/my%20set/data.yaml?token=eyJ", "sign"),
        (
            "https://abc.supabase.co/storage/v1/object/authenticated/datasets/p/my%20set/data.yaml",
            "authenticated",
        ),
        ("https://abc.supabase.co/storage/v1/object/datasets/p/my%20set/data.yaml", "authenticated"),
    ],
)
def test_supabase_storage_urls(url: str, kind: str) -> None:
    ref = parse_dataset_ref(url, None)
    assert isinstance(ref, StorageRef)
    assert (ref.bucket, ref.path, ref.url_kind, ref.url) == ("datasets", "p/my set/data.yaml", kind, url)
    assert ref.origin == "https://abc.supabase.co"
    assert "eyJ" not in ref.cache_key


def test_signed_urls_with_different_tokens_share_a_cache_key() -> None:
    a = parse_dataset_ref("https://abc.supabase.co/storage/v1/object/sign/d/p/data.yaml?token=one", None)
    b = parse_dataset_ref("https://abc.supabase.co/storage/v1/object/sign/d/p/data.yaml?token=two", None)
    assert a.cache_key == b.cache_key  # type: ignore[union-attr]


def test_normalize_url() -> None:
    a = normalize_url("HTTPS://Host.Example:443/a/./b/../data.yaml?v=2&X-Amz-Signature=s&token=t&a=1#frag")
    assert a == "https://host.example/a/data.yaml?a=1&v=2"
    assert normalize_url("http://h:8080/x.yaml") == "http://h:8080/x.yaml"
