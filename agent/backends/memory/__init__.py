"""In-process fakes of the ports, with the postgres backend's semantics, for fast tests."""

from agent.backends.memory.blobs import MemoryBlobs, StoredBlob
from agent.backends.memory.events import MemoryEvents
from agent.backends.memory.store import MemoryStore, Record, WorkerRecord

__all__ = ["MemoryBlobs", "MemoryEvents", "MemoryStore", "Record", "StoredBlob", "WorkerRecord"]
