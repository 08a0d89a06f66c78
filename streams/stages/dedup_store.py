"""The dedup stage's state: identities seen in the window, in RocksDB (rocksdict) behind Bloom filters.

Layout. One 16-byte key per identity, valued with the stream time it was seen at, in one column family
per ``window``-wide bucket of stream time (the max input record timestamp of the partition, capped at
the wall clock). A lookup consults the buckets that can hold a live identity and honours the stored
time, so the window is exact; a whole bucket is dropped at once when it falls out, which bounds the
disk to about two windows.

Bloom filters. Nearly every lookup misses, and a RocksDB multi-get costs ~0.3 us per key even then. Each
bucket written by this process has an in-memory Bloom filter (`BucketFilter`) in front of it; only the
identities it may hold go to RocksDB. Identities are uniform BLAKE2b digests, so the filter takes its
word and bits straight from the digest's two 64-bit halves and probes a whole batch with numpy: no
library offers a vectorised probe over raw digests. Memory is bounded by
``bloom_budget`` per store; a bucket whose filter would pass it, and any bucket found on disk when a
partition is opened (its keys are not read back), is unfiltered: its lookups all go to RocksDB. Filters
are rebuilt by recovery, which writes the changelog's identities through `remember`.

Changelog. A record carries one batch of one partition: the last output offset it covers and its new
identities grouped by stream time (`encode_changelog`). Records of the previous format (one time, one
output offset, the identities; written before batching) are still read (`decode_changelog`).
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from collections import deque
from collections.abc import Iterable, Sequence
from itertools import accumulate, chain, repeat
from pathlib import Path
from typing import Any

import numpy as np
from rocksdict import (
    BlockBasedOptions,
    Cache,
    MemtableFactory,
    Options,
    Rdict,
    SliceTransform,
    WriteBatch,
    WriteBufferManager,
)

from streams.stages.dedup_core import IDENTITY_SIZE

_META = b"kotel\0dedup\0meta"  # default column family: stream time and the last output covered
_META_FMT = struct.Struct(">qiq")  # stream time ms, output partition, output offset (-1: none)
_CHANGELOG_OFFSET = b"kotel\0dedup\0changelog"  # the last changelog record the state includes
_TS = struct.Struct(">q")
_BLOCK_CACHE_BYTES = 40 * 1024 * 1024  # per table; memtables are charged to it as well
# All memtables of a table together: past this, the largest is flushed. Small memtables flush cheaper (the
# hashed memtable is re-sorted at flush, ~2x dearer per key at 16 MiB than at 4), and with 64 / 48 MiB
# the worker passed 512 MiB RSS holding a 15M window (516 and 523 MiB; 484 and 494 with 40 / 24 MiB, the
# same throughput over 3M spans but ~10 % less over 9M, where compaction grows: stages.md round 7).
_MEMTABLE_BYTES = 24 * 1024 * 1024
BLOOM_BUDGET = 64 * 1024 * 1024  # bytes of Bloom filter bits per store (15M identities take ~40 MiB)

_FILTER_WAITING = 8192  # identities written before they are added to their filter's bits
_FILTER_MIN_PROBE = 64  # fewer identities than this go straight to RocksDB

Groups = Sequence[tuple[int, Sequence[bytes]]]  # (stream time ms, identities first seen then)


def _words(ids: Sequence[bytes]) -> np.ndarray:
    """The digests as rows of two uint64 words (the Bloom filter's two hashes)."""
    return np.frombuffer(b"".join(ids), "<u8").reshape(-1, 2)


_SHIFTS = [np.uint64(s) for s in range(0, 36, 6)]  # 6 bits per identity
_ONE, _SIX_BITS = np.uint64(1), np.uint64(63)


def _hashes(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per identity: the word to use (first half of the digest) and the bits to set in it (second half)."""
    second = words[:, 1]
    pattern = np.zeros(len(words), np.uint64)
    for shift in _SHIFTS:  # 1-D passes: cheaper than a 2-D array reduced along its rows
        pattern |= _ONE << ((second >> shift) & _SIX_BITS)
    return words[:, 0], pattern


class _Layer:
    """A blocked Bloom filter of ``capacity`` identities, 10 bits each: an identity's 6 bits lie in one
    64-bit word, so a probe is one gather (~2 % false positives)."""

    def __init__(self, capacity: int) -> None:
        bits = 1 << max(16, (capacity * 10 - 1).bit_length())
        self.capacity, self.count, self.mask = capacity, 0, np.uint64(bits // 64 - 1)
        self.bits = np.zeros(bits // 64, np.uint64)

    def add(self, word: np.ndarray, pattern: np.ndarray) -> None:
        np.bitwise_or.at(self.bits, (word & self.mask).astype(np.intp), pattern)
        self.count += len(word)

    def maybe(self, word: np.ndarray, pattern: np.ndarray) -> np.ndarray:
        return (self.bits[(word & self.mask).astype(np.intp)] & pattern) == pattern  # type: ignore[no-any-return]


class BucketFilter:
    """Layers of growing size (a scalable Bloom filter): a bucket's size is not known when it opens."""

    FIRST_CAPACITY = 1 << 16

    def __init__(self) -> None:
        self.layers: list[_Layer] = []
        self.waiting: list[bytes] = []  # written, not yet in the bits: added in bulk (numpy has a fixed cost)

    @property
    def nbytes(self) -> int:
        return sum(layer.bits.nbytes for layer in self.layers)

    def add(self, words: np.ndarray, budget: list[int]) -> bool:
        """Add identities; False (and the filter must be dropped) if a new layer would pass the budget."""
        word, pattern = _hashes(words)
        while len(word):
            layer = self.layers[-1] if self.layers else None
            if layer is None or layer.count >= layer.capacity:
                layer = _Layer(layer.capacity * 2 if layer is not None else self.FIRST_CAPACITY)
                if layer.bits.nbytes > budget[0]:
                    return False
                budget[0] -= layer.bits.nbytes
                self.layers.append(layer)
            room = layer.capacity - layer.count
            layer.add(word[:room], pattern[:room])
            word, pattern = word[room:], pattern[room:]
        return True

    def maybe(self, words: np.ndarray) -> np.ndarray:
        word, pattern = _hashes(words)
        found = np.zeros(len(words), bool)
        for layer in self.layers:
            found |= layer.maybe(word, pattern)
        return found


class _Partition:
    """One partition's RocksDB: bucket column families by index, their filters, stream time, last output."""

    def __init__(self, db: Rdict, cf_options: Options, budget: list[int]) -> None:
        self.db, self.cf_options, self.budget = db, cf_options, budget
        self.buckets: dict[int, Rdict] = {}
        self.filters: dict[int, BucketFilter] = {}  # a bucket without one is unfiltered
        for name in Rdict.list_cf(db.path()):
            if name.startswith("ids-"):
                self.buckets[int(name[4:])] = db.get_column_family(name)
        raw = db.get(_META)
        self.stream_ms, self.out_partition, self.out_offset = _META_FMT.unpack(raw) if raw else (0, -1, -1)
        raw = db.get(_CHANGELOG_OFFSET)
        self.changelog_offset: int = _TS.unpack(raw)[0] if raw else -1

    def handle(self, index: int) -> Any:
        """The column family handle of bucket ``index``, created (with a filter) on first use."""
        if index not in self.buckets:
            self.buckets[index] = self.db.create_column_family(f"ids-{index}", self.cf_options)
            self.filters[index] = BucketFilter()
        return self.db.get_column_family_handle(f"ids-{index}")

    def add_to_filter(self, index: int, ids: Sequence[bytes]) -> None:
        found = self.filters.get(index)
        if found is not None:
            found.waiting.extend(ids)
            if len(found.waiting) >= _FILTER_WAITING:
                self._flush_filter(index, found)

    def filter_for(self, index: int) -> BucketFilter | None:
        """The bucket's filter with every identity written so far, or None: the bucket is unfiltered."""
        found = self.filters.get(index)
        if found is not None and found.waiting:
            self._flush_filter(index, found)
        return self.filters.get(index)

    def _flush_filter(self, index: int, found: BucketFilter) -> None:
        ids, found.waiting = found.waiting, []
        if not found.add(_words(ids), self.budget):
            self.drop_filter(index)

    def drop_filter(self, index: int) -> None:
        found = self.filters.pop(index, None)
        if found is not None:
            self.budget[0] += found.nbytes

    def advance(self, now_ms: int, window_ms: int) -> None:
        """Move stream time forward and drop buckets that can no longer hold a live identity."""
        if now_ms <= self.stream_ms:
            return
        self.stream_ms = now_ms
        oldest = now_ms // window_ms - 1
        for index in [i for i in self.buckets if i < oldest]:
            del self.buckets[index]
            self.drop_filter(index)
            self.db.drop_column_family(f"ids-{index}")

    def close(self) -> None:
        for index in list(self.filters):
            self.drop_filter(index)


class SeenStore:
    """The identities of one signal's partitions, a RocksDB per partition under ``path``; see module doc.

    Partitions are opened when assigned and kept open after a revoke: a partition that comes back finds
    its state and reads only the changelog past its `changelog_offset`.
    """

    def __init__(self, path: Path, *, window_ms: int, bloom_budget: int = BLOOM_BUDGET) -> None:
        self.path, self.window_ms = path, window_ms
        self._parts: dict[int, _Partition] = {}
        self._budget = [bloom_budget]  # shared by the partitions' filters
        cache = Cache(_BLOCK_CACHE_BYTES)
        self._db_options = Options(raw_mode=True)
        self._db_options.create_if_missing(True)
        self._db_options.set_write_buffer_manager(
            WriteBufferManager.new_write_buffer_manager_with_cache(_MEMTABLE_BYTES, False, cache))
        self._db_options.set_max_background_jobs(2)
        self._db_options.set_allow_concurrent_memtable_write(False)  # required by the hashed memtable
        table = BlockBasedOptions()
        table.set_bloom_filter(10, False)
        table.set_block_cache(cache)
        cf = self._cf_options = Options(raw_mode=True)
        cf.set_block_based_table_factory(table)
        # Keys are uniformly random 16-byte digests: a hashed memtable inserts and probes in O(1), where
        # the default skip list made inserts about ten times dearer (measured with rocksdict).
        cf.set_prefix_extractor(SliceTransform.create_fixed_prefix(IDENTITY_SIZE))
        cf.set_memtable_factory(MemtableFactory.hash_link_list(1 << 16))
        # For unfiltered buckets: a Bloom filter over the memtable (prefix = whole key) answers most misses
        # without walking it, which halved the lookup time at a million keys (measured).
        cf.set_memtable_prefix_bloom_ratio(0.1)
        cf.set_memtable_whole_key_filtering(True)
        cf.set_write_buffer_size(16 * 1024 * 1024)

    def partition_path(self, partition: int) -> Path:
        return self.path / f"{partition}.db"

    def _state(self, partition: int) -> _Partition:
        part = self._parts.get(partition)
        if part is None:
            path = self.partition_path(partition)
            path.parent.mkdir(parents=True, exist_ok=True)
            names = Rdict.list_cf(str(path)) if (path / "CURRENT").exists() else []
            families = {name: self._cf_options for name in names if name != "default"}
            db = Rdict(str(path), options=self._db_options, column_families=families or None)
            part = self._parts[partition] = _Partition(db, self._cf_options, self._budget)
        return part

    def open(self, partition: int) -> None:
        self._state(partition)

    def close(self) -> None:
        for part in self._parts.values():
            part.close()
            part.db.close()
        self._parts.clear()

    def lookup(self, partition: int, ids: Sequence[bytes], now_ms: int) -> list[bool]:
        """Whether each identity was seen within the window before ``now_ms`` (stream time)."""
        return self.lookup_batch(partition, ids, [len(ids)], [now_ms])

    def lookup_batch(self, partition: int, ids: Sequence[bytes], ends: Sequence[int],
                     stamps: Sequence[int]) -> list[bool]:
        """`lookup` for consecutive records: record r owns ``ids[ends[r-1]:ends[r]]`` and came at
        ``stamps[r]``; each is judged against the stream time it would have had alone (exact window)."""
        part = self._state(partition)
        seen = [False] * len(ids)
        if not ids:
            part.advance(max(stamps, default=0), self.window_ms)
            return seen
        times = list(accumulate(stamps, max, initial=part.stream_ms))[1:]
        window = self.window_ms
        words = _words(ids)
        todo = np.arange(len(ids))
        for index in range(times[-1] // window, times[0] // window - 2, -1):
            cf = part.buckets.get(index)
            if cf is None or not len(todo):
                continue
            # A few identities cost less asked of RocksDB than probed with numpy.
            found_filter = part.filter_for(index) if len(todo) >= _FILTER_MIN_PROBE else None
            ask = todo[found_filter.maybe(words[todo])] if found_filter is not None else todo
            if not len(ask):
                continue
            asked = ask.tolist()
            found = cf.get([ids[i] for i in asked])
            if found.count(None) == len(found):
                continue  # the common case: nothing seen, and no Python-level loop
            hits = []
            for i, value in zip(asked, found, strict=True):
                if value is not None and _TS.unpack(value)[0] >= times[bisect_right(ends, i)] - window:
                    seen[i] = True
                    hits.append(i)
            todo = np.setdiff1d(todo, hits, assume_unique=True)
        part.advance(times[-1], window)
        return seen

    def remember(self, partition: int, ids: Sequence[bytes], ts_ms: int, out: tuple[int, int] | None) -> None:
        """Store identities seen at ``ts_ms`` and, if given, the last output offset they cover."""
        self.remember_groups(partition, [(ts_ms, ids)], out)

    def remember_groups(self, partition: int, groups: Groups, out: tuple[int, int] | None) -> None:
        """Store each group's identities with its stream time, all in one RocksDB write batch."""
        part = self._state(partition)
        part.advance(max((stamp for stamp, _ in groups), default=0), self.window_ms)
        by_bucket: dict[int, list[tuple[int, Sequence[bytes]]]] = {}
        oldest = part.stream_ms // self.window_ms - 1
        for stamp, ids in groups:
            if ids and stamp // self.window_ms >= oldest:
                by_bucket.setdefault(stamp // self.window_ms, []).append((stamp, ids))
        batch = WriteBatch(raw_mode=True)
        for index, found in by_bucket.items():
            batch.set_default_column_family(part.handle(index))
            keys = list(chain.from_iterable(ids for _, ids in found))
            values = chain.from_iterable(repeat(_TS.pack(stamp), len(ids)) for stamp, ids in found)
            deque(map(batch.put, keys, values), maxlen=0)  # no Python-level loop
            part.add_to_filter(index, keys)
        if out is not None and out[1] >= 0 and (out[0] != part.out_partition or out[1] > part.out_offset):
            part.out_partition, part.out_offset = out
        batch.set_default_column_family(None)
        batch.put(_META, _META_FMT.pack(part.stream_ms, part.out_partition, part.out_offset))
        part.db.write(batch)

    def last_output(self, partition: int) -> tuple[int, int]:
        part = self._state(partition)
        return part.out_partition, part.out_offset

    def changelog_offset(self, partition: int) -> int:
        """The last changelog offset this partition's state includes (-1: none)."""
        return self._state(partition).changelog_offset

    def set_changelog_offset(self, partition: int, offset: int) -> None:
        part = self._state(partition)
        if offset > part.changelog_offset:
            part.changelog_offset = offset
            part.db.put(_CHANGELOG_OFFSET, _TS.pack(offset))

    def apply_changelog(self, partition: int, records: Sequence[tuple[int, bytes | None]]) -> int:
        """Recovery: each changelog record (offset, value) is an output offset plus the identities it
        adds; returns how many records were ours to read."""
        read = 0
        for _, value in records:
            found = decode_changelog(value)
            if found is not None:
                self.remember_groups(partition, found[1], found[0])
                read += 1
        if records:
            self.set_changelog_offset(partition, records[-1][0])
        return read

    def estimated_keys(self, partitions: Iterable[int]) -> int:
        """Identities held for ``partitions``, as RocksDB estimates. Called at scrape time on the event loop
        while recovery may add buckets on the consumer's thread: the bucket lists are copied first."""
        return sum(cf.property_int_value("rocksdb.estimate-num-keys") or 0
                   for partition in partitions if (part := self._parts.get(partition)) is not None
                   for cf in list(part.buckets.values()))


_V1 = struct.Struct(">qiq")  # stream time, output partition, output offset; identities follow
_V2 = struct.Struct(">4sBiqI")  # magic, version, output partition, output offset, group count
_V2_GROUP = struct.Struct(">qI")  # stream time, identity count
_MAGIC = b"\0kdc"


def encode_changelog(out: tuple[int, int], groups: Groups) -> bytes:
    """One changelog value: the output offset covered, then (time, count) per group, then identities.

    Its length is 21 + 12 x groups + 16 x identities, never 20 + a multiple of 16, so a worker of the
    previous release (rolled back onto this changelog) skips the record instead of misreading it.
    """
    head = _V2.pack(_MAGIC, 2, out[0], out[1], len(groups))
    return head + b"".join(_V2_GROUP.pack(stamp, len(ids)) for stamp, ids in groups) + b"".join(
        chain.from_iterable(ids for _, ids in groups))


CHANGELOG_MAX_IDS = 32 * 1024  # per changelog record: 512 KiB of identities, under Kafka's 1 MiB default


def changelog_records(out: tuple[int, int], groups: Groups, max_ids: int = CHANGELOG_MAX_IDS) -> list[bytes]:
    """A batch's changelog values, each under the topic's record size limit (a batch can hold 100k ids)."""
    records: list[bytes] = []
    chunk: list[tuple[int, Sequence[bytes]]] = []
    room = max_ids
    for stamp, ids in groups:
        at = 0
        while at < len(ids):
            part = ids[at:at + room]
            chunk.append((stamp, part))
            at += len(part)
            room -= len(part)
            if not room:
                records.append(encode_changelog(out, chunk))
                chunk, room = [], max_ids
    if chunk or not records:
        records.append(encode_changelog(out, chunk))
    return records


def decode_changelog(value: bytes | None) -> tuple[tuple[int, int], list[tuple[int, list[bytes]]]] | None:
    """(output offset covered, groups) of either format; None for a record we cannot read."""
    if not value:
        return None
    size = IDENTITY_SIZE
    if value.startswith(_MAGIC) and len(value) >= _V2.size:
        _, version, out_p, out_off, count = _V2.unpack_from(value)
        at = _V2.size + count * _V2_GROUP.size
        heads = [_V2_GROUP.unpack_from(value, _V2.size + g * _V2_GROUP.size) for g in range(count)]
        if version != 2 or len(value) != at + size * sum(n for _, n in heads):
            return None
        groups = []
        for stamp, n in heads:
            groups.append((stamp, [value[i:i + size] for i in range(at, at + n * size, size)]))
            at += n * size
        return (out_p, out_off), groups
    if len(value) < _V1.size or (len(value) - _V1.size) % size:
        return None
    stamp, out_p, out_off = _V1.unpack_from(value)
    return (out_p, out_off), [(stamp, [value[i:i + size] for i in range(_V1.size, len(value), size)])]
