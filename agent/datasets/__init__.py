"""Datasets: resolve a run's `data_yaml` (local, HTTP(S), Supabase Storage) into a run workspace."""

from agent.datasets.cache import DownloadFailed, RetryPolicy
from agent.datasets.disk import DiskSpace
from agent.datasets.http import HttpSource
from agent.datasets.labels import LabelStats, infer_task, normalize_text
from agent.datasets.policy import SourcePolicy
from agent.datasets.preparer import DatasetPreparer, LocalDatasets
from agent.datasets.refs import (
    DatasetRef,
    HttpRef,
    LocalRef,
    RemoteRef,
    StorageRef,
    normalize_url,
    parse_dataset_ref,
)
from agent.datasets.remote import (
    ListingUnavailable,
    RemoteError,
    RemoteFile,
    RemoteNotFound,
    RemoteSource,
    RemoteTransient,
    SourceFactory,
)

__all__ = [
    "DatasetPreparer",
    "DatasetRef",
    "DiskSpace",
    "DownloadFailed",
    "HttpRef",
    "HttpSource",
    "LabelStats",
    "ListingUnavailable",
    "LocalDatasets",
    "LocalRef",
    "RemoteError",
    "RemoteFile",
    "RemoteNotFound",
    "RemoteRef",
    "RemoteSource",
    "RemoteTransient",
    "RetryPolicy",
    "SourceFactory",
    "SourcePolicy",
    "StorageRef",
    "infer_task",
    "normalize_text",
    "normalize_url",
    "parse_dataset_ref",
]
