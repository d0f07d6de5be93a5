"""Results store: the SQLite database of a workspace and crash-safe run files."""
from kdlab.store.database import STATUSES, Heartbeat, RunRecord, Store
from kdlab.store.files import append_jsonl, atomic_write_bytes, atomic_write_json, atomic_write_text, read_jsonl

__all__ = [
    "STATUSES",
    "Heartbeat",
    "RunRecord",
    "Store",
    "append_jsonl",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "read_jsonl",
]
