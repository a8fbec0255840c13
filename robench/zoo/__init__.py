"""The checkpoint zoo: published checkpoints with their hash, settings and results, fetched safely.

``manifest`` reads and writes the entries; ``cache`` says where local copies lie and checks them;
``download`` fetches one (resumable, verified before it is installed; ``transfer`` is its network
side); ``publish`` turns a trained run into an entry and an entry into RobustBench model info.
"""

from robench.zoo.cache import CacheError, cache_dir, cached_path, local_path, shipped_path, verify, where
from robench.zoo.download import FetchError, fetch, obtain
from robench.zoo.manifest import Entry, entries, find, get, read_manifest, write_manifest
from robench.zoo.publish import entry_from_run, results_for, robustbench_info

__all__ = ["CacheError", "Entry", "FetchError", "cache_dir", "cached_path", "entries", "entry_from_run", "fetch",
           "find", "get", "local_path", "obtain", "read_manifest", "results_for", "robustbench_info", "shipped_path",
           "verify", "where", "write_manifest"]
