"""Typed facades over the datapath's maps, by fd (bcc-loaded or pinned), with batched updates.

`Map` wraps one map with its ctypes key/value types from `xdpoib.abi`; `Maps` knows every map of the
datapath by name and offers the operations the agent needs (VIFs, peers, groups, partitions, counters).
Big maps are emptied with batched deletes, never bcc's `clear()` (minutes on 1e6 entries).
"""

from __future__ import annotations

import ctypes as ct
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from xdpoib import abi
from xdpoib.datapath import bpfsys
from xdpoib.errors import XdpoibError

PIN_ROOT = Path("/sys/fs/bpf/xdpoib")

# map name -> (key type, value type, per-CPU); the array maps (keys are indexes) are in ARRAYS
LAYOUT: dict[str, tuple[type, type, bool]] = {
    "xo_stats": (ct.c_uint32, abi.Stats, True),
    "xo_vif_mac": (abi.MacKey, abi.Vif, False),
    "xo_vif_id": (abi.U32Key, abi.Vif, False),
    "xo_peer_mac": (abi.MacKey, abi.Peer, False),
    "xo_peer_id": (ct.c_uint32, abi.Peer, False),
    "xo_vifmac_slot": (ct.c_uint32, abi.Vif, False),
    "xo_vifid_slot": (ct.c_uint32, abi.Vif, False),
    "xo_peermac_slot": (ct.c_uint32, abi.Peer, False),
    "xo_by_addr": (abi.AddrKey, abi.MacValue, False),
    "xo_group": (abi.MgidKey, abi.Group, False),
    "xo_vlan": (ct.c_uint32, abi.Vlan, False),
    "xo_pkey": (ct.c_uint32, abi.Pkey, False),
    "xo_config": (ct.c_uint32, abi.Config, False),
    "xo_xsks": (ct.c_uint32, ct.c_uint32, False),
    "xo_egress": (ct.c_uint32, ct.c_uint32, False),
    "xo_inject": (ct.c_uint32, abi.InjectSlot, False),
    "xo_inject_idx": (ct.c_uint32, ct.c_uint32, True),
}
# array maps that are not per-CPU -> their size (every index always exists: "empty" is a zeroed value)
ARRAYS = {"xo_peer_id": abi.MAX_PEERS, "xo_vifmac_slot": abi.VIF_SLOTS, "xo_vifid_slot": abi.VIF_SLOTS,
          "xo_peermac_slot": abi.PEER_SLOTS, "xo_vlan": abi.MAX_VLANS, "xo_pkey": abi.MAX_PKEYS,
          "xo_config": 1, "xo_inject": abi.INJECT_SLOTS}
BATCH = 4096
_ENTITY = struct.Struct("<I6sBx20s")   # struct xdpoib_vif / xdpoib_peer


class MapError(XdpoibError):
    """A map operation failed (full map, wrong layout, missing pin)."""


BIG = 4096                  # peers per call from which the packed path (numpy, threads) pays off


@dataclass(frozen=True)
class PeerBatch:
    """Peers packed for a big load or removal: ids (u32, little-endian), REMACs (6 bytes each) and
    IPoIB addresses (20 bytes each), each one bytes object: no Python object per peer."""

    ids: bytes
    macs: bytes
    addrs: bytes

    def __post_init__(self):
        n = len(self.ids) // 4
        if len(self.ids) != 4 * n or len(self.macs) != 6 * n or len(self.addrs) != 20 * n:
            raise MapError(f"a peer batch needs 4/6/20 bytes per peer, got {len(self.ids)}/{len(self.macs)}/"
                           f"{len(self.addrs)}")

    def __len__(self) -> int:
        return len(self.ids) // 4

    @classmethod
    def of(cls, peers) -> PeerBatch:
        """Pack (peer_id, remac, addr20) tuples."""
        peers = list(peers)
        return cls(struct.pack(f"<{len(peers)}I", *(i for i, _, _ in peers)), b"".join(bytes(m) for _, m, _ in peers),
                   b"".join(bytes(a) for _, _, a in peers))

    def tuples(self):
        for k in range(len(self)):
            yield (int.from_bytes(self.ids[4 * k:4 * k + 4], "little"), self.macs[6 * k:6 * k + 6],
                   self.addrs[20 * k:20 * k + 20])


def _np():
    """numpy if it is installed (Debian python3-numpy, which python3-matplotlib brings), else None:
    then big loads take the per-peer path."""
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def _mac_slots(np, macs):
    """XDPOIB_MAC_SLOT of every row of an (n, 6) uint8 array, before masking."""
    m = macs.astype(np.uint32)
    x = (m[:, 2] << 24 | m[:, 3] << 16 | m[:, 4] << 8 | m[:, 5]) ^ (m[:, 0] << 8 | m[:, 1])
    return x ^ (x >> 16)


def _addr_keys(np, addrs):
    """struct xdpoib_addr_key of every row of an (n, 20) uint8 array of IPoIB addresses."""
    keys = np.zeros((len(addrs), 20), np.uint8)
    keys[:, 0:3] = addrs[:, 1:4]
    keys[:, 4:20] = addrs[:, 4:20]
    return keys


def _check_ids(ids) -> None:
    """Peer ids index the xo_peer_id array: each must be in [1, MAX_PEERS)."""
    bad = [i for i in ids if not 0 < i < abi.MAX_PEERS]
    if bad:
        raise MapError(f"peer id {bad[0]} is outside [1, {abi.MAX_PEERS})")


def _check_ids_np(ids) -> None:
    if len(ids) and (int(ids.min()) == 0 or int(ids.max()) >= abi.MAX_PEERS):
        _check_ids(ids[(ids == 0) | (ids >= abi.MAX_PEERS)][:1].tolist())


def _parallel(*calls) -> None:
    """Run (fn, *args) calls on threads at once (bpf(2) releases the GIL: the kernel's hash inserts
    into different maps overlap); the first error is raised after all have finished."""
    import threading

    errors: list[BaseException] = []

    def run(fn, *args):
        try:
            fn(*args)
        except BaseException as e:
            errors.append(e)
    threads = [threading.Thread(target=run, args=c) for c in calls[1:]]
    for t in threads:
        t.start()
    run(*calls[0])
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def possible_cpus() -> int:
    """Return the number of possible CPUs (the width of per-CPU map values)."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n


class Map:
    """One BPF map with typed keys and values. An array map (`size`: its number of indexes) always holds
    every index: `count` and `clear` treat a zeroed value as an empty slot."""

    def __init__(self, fd: int, key_type: type, value_type: type, percpu: bool = False, name: str = "",
                 size: int | None = None):
        self.fd, self.key_type, self.value_type, self.percpu, self.name = fd, key_type, value_type, percpu, name
        self.size = size
        self._ncpu = possible_cpus() if percpu else 1
        # a per-CPU value is laid out in 8-byte steps (the kernel rounds each CPU's value up to 8 bytes)
        vs = ct.sizeof(value_type)
        if percpu and vs % 8:
            self._slot = type(f"{value_type.__name__}Slot", (ct.Structure,),
                              {"_fields_": [("v", value_type), ("pad", ct.c_uint8 * (8 - vs % 8))]})
        else:
            self._slot = None

    def _key(self, key):
        if isinstance(key, self.key_type):
            return key
        if isinstance(key, bytes | bytearray):
            return self.key_type.from_buffer_copy(key)
        return self.key_type(key)

    def _value(self, value):
        return value if isinstance(value, self.value_type) else self.value_type(value)

    def get(self, key):
        """Return the value (a list of per-CPU values for per-CPU maps), or None if absent."""
        if self.percpu:
            buf = ((self._slot or self.value_type) * self._ncpu)()
            if not bpfsys.map_lookup(self.fd, self._key(key), buf):
                return None
            return [x.v for x in buf] if self._slot else list(buf)
        v = self.value_type()
        return v if bpfsys.map_lookup(self.fd, self._key(key), v) else None

    def set(self, key, value) -> None:
        """Insert or replace one element (per-CPU maps: the same value on every CPU)."""
        if self.percpu:
            if self._slot:
                buf = (self._slot * self._ncpu)(*[self._slot(v=self._value(value)) for _ in range(self._ncpu)])
            else:
                buf = (self.value_type * self._ncpu)(*([value] * self._ncpu))
            bpfsys.map_update(self.fd, self._key(key), buf)
            return
        bpfsys.map_update(self.fd, self._key(key), self._value(value))

    def delete(self, key) -> bool:
        """Delete one element; False if absent."""
        return bpfsys.map_delete(self.fd, self._key(key))

    def keys(self) -> Iterator:
        """Iterate over the keys (a snapshot walk: do not delete while iterating)."""
        k, nk = None, self.key_type()
        while bpfsys.map_next_key(self.fd, k, nk):
            yield nk
            k, nk = nk, self.key_type()

    def count(self) -> int:
        """Return the number of elements (walks the keys); of an array, the indexes holding a value
        that is not all zeroes (one batched read of the whole array)."""
        if self.size is not None:
            return len(self.used_indexes())
        return sum(1 for _ in self.keys())

    def used_indexes(self) -> list[int]:
        """An array map's indexes whose value is not all zeroes, read in one batched lookup."""
        vs = ct.sizeof(self.value_type)
        _, raw, n = bpfsys.map_lookup_batch(self.fd, 4, vs, self.size)
        np = _np()
        if np is not None:
            rows = np.frombuffer(raw, np.uint8).reshape(n, vs)
            return np.flatnonzero(rows.any(axis=1)).tolist()
        zero = bytes(vs)
        return [i for i in range(n) if raw[i * vs:(i + 1) * vs] != zero]

    def zero_raw(self, indexes: bytes) -> int:
        """Write zeroed values at an array map's indexes given as packed u32 (batched); return how many."""
        return self.update_batch_raw(indexes, bytes(ct.sizeof(self.value_type) * (len(indexes) // 4)))

    def update_batch(self, pairs: Iterable[tuple]) -> int:
        """Insert or replace many (key, value) pairs, BATCH per bpf(2) call; return how many."""
        pairs = list(pairs)
        for i in range(0, len(pairs), BATCH):
            chunk = pairs[i:i + BATCH]
            keys = (self.key_type * len(chunk))(*(self._key(k) for k, _ in chunk))
            vals = (self.value_type * len(chunk))(*(self._value(v) for _, v in chunk))
            bpfsys.map_update_batch(self.fd, keys, vals, len(chunk))
        return len(pairs)

    def update_batch_raw(self, keys: bytes, values: bytes) -> int:
        """Insert or replace elements given as packed key and value bytes (the fast path for big loads)."""
        ks, vs = ct.sizeof(self.key_type), ct.sizeof(self.value_type)
        n = len(keys) // ks
        if len(keys) != n * ks or len(values) != n * vs:
            raise MapError(f"{self.name}: {len(keys)} key bytes and {len(values)} value bytes for {n} entries")
        for i in range(0, n, BATCH):
            c = min(BATCH, n - i)
            karr = (self.key_type * c).from_buffer_copy(keys, i * ks)
            varr = (self.value_type * c).from_buffer_copy(values, i * vs)
            bpfsys.map_update_batch(self.fd, karr, varr, c)
        return n

    def delete_batch_raw(self, keys: bytes) -> int:
        """Delete elements given as packed key bytes, BATCH per call; return how many were deleted."""
        ks = ct.sizeof(self.key_type)
        n, done = len(keys) // ks, 0
        for i in range(0, n, BATCH):
            c = min(BATCH, n - i)
            done += bpfsys.map_delete_batch(self.fd, (self.key_type * c).from_buffer_copy(keys, i * ks), c)
        return done

    def delete_batch(self, keys: Iterable) -> int:
        """Delete many keys, BATCH per call; return how many were deleted."""
        keys = [self._key(k) for k in keys]
        done = 0
        for i in range(0, len(keys), BATCH):
            chunk = keys[i:i + BATCH]
            arr = (self.key_type * len(chunk))(*chunk)
            done += bpfsys.map_delete_batch(self.fd, arr, len(chunk))
        return done

    def clear(self) -> int:
        """Delete every element with batched deletes (an array: zero every used index); return how many."""
        if self.size is not None:
            used = self.used_indexes()
            return self.zero_raw(struct.pack(f"<{len(used)}I", *used))
        return self.delete_batch(list(self.keys()))


class Maps:
    """Every map of one datapath, with the agent-level operations."""

    def __init__(self, fds: dict[str, int], owned: bool = False):
        self._fds, self._owned = fds, owned
        for name, (kt, vt, percpu) in LAYOUT.items():
            if name in fds:
                setattr(self, name[3:], Map(fds[name], kt, vt, percpu, name, ARRAYS.get(name)))

    @classmethod
    def of(cls, dp) -> Maps:
        """Facades over a loaded `Datapath`'s maps."""
        return cls({name: dp.map_fd(name) for name in LAYOUT})

    @classmethod
    def open_pinned(cls, pin_dir: Path) -> Maps:
        """Open the maps pinned under pin_dir (see `pin`); close() closes their fds."""
        fds = {}
        try:
            for name in LAYOUT:
                fds[name] = bpfsys.obj_get(str(pin_dir / name))
        except bpfsys.BpfSyscallError as e:
            for fd in fds.values():
                os.close(fd)
            raise MapError(f"cannot open pinned maps under {pin_dir}: {e.strerror}") from e
        return cls(fds, owned=True)

    def pin(self, pin_dir: Path) -> None:
        """Pin every map under pin_dir (a bpffs directory, created if needed)."""
        pin_dir.mkdir(parents=True, exist_ok=True)
        for name, fd in self._fds.items():
            bpfsys.obj_pin(fd, str(pin_dir / name))

    def close(self) -> None:
        """Close fds this object opened (pinned maps stay pinned). Idempotent."""
        if self._owned:
            for fd in self._fds.values():
                os.close(fd)
            self._owned = False

    # --------------------------------------------------------------------------------- entities

    def _fill_slots(self, by_mac: Map, by_id: Map | None, nslots: int,
                    entries: list[tuple[int, bytes, bytes]]) -> None:
        """Put entries (id, mac, packed value) into the direct-mapped caches (last one wins a slot);
        by_id None: there is no cache by id (peers: the id map is an array already)."""
        mask = nslots - 1
        mac_slots = {((x := int.from_bytes(m[2:6], "big") ^ int.from_bytes(m[0:2], "big")) ^ (x >> 16)) & mask: v
                     for _, m, v in entries}
        id_slots = {i & mask: v for i, _, v in entries} if by_id is not None else {}
        for cache, slots in ((by_mac, mac_slots), (by_id, id_slots)):
            if slots:
                cache.update_batch_raw(struct.pack(f"<{len(slots)}I", *slots), b"".join(slots.values()))

    def _clear_slots(self, by_mac: Map, by_id: Map | None, nslots: int,
                     entries: list[tuple[int, bytes, bytes]]) -> None:
        """Empty the cache slots that hold any of these entries (checked by MAC or id; by_id None: no
        cache by id), writing back only the changed slots. Many entries: the caches are read whole (one
        batched lookup each); a few (an idle peer, an eviction): only their slots are read, one lookup
        each, instead of the 2 MiB of a whole cache."""
        vs = ct.sizeof(by_mac.value_type)
        few = len(entries) * 64 < nslots
        caches = [(by_mac, lambda e: abi.mac_slot(e[1], nslots), lambda e, v: v[4:10] == e[1])]
        if by_id is not None:
            caches.append((by_id, lambda e: abi.id_slot(e[0], nslots),
                           lambda e, v: int.from_bytes(v[0:4], "little") == e[0]))
        for cache, slot_of, match in caches:
            if few:
                slots = {slot_of(e) for e in entries}
                vals, n = {}, nslots
                for s in slots:
                    v = cache.get(s)
                    vals[s] = bytes(v) if v is not None else bytes(vs)
                def value(s, vals=vals):
                    return vals[s]
            else:
                _, raw, n = bpfsys.map_lookup_batch(cache.fd, 4, vs, nslots)
                def value(s, raw=raw):
                    return raw[s * vs:(s + 1) * vs]
            hit = set()
            for e in entries:
                s = slot_of(e)
                if s in hit or s >= n:
                    continue
                v = value(s)
                if v[10] & abi.F_VALID and match(e, v):
                    hit.add(s)
            if hit:
                cache.update_batch_raw(struct.pack(f"<{len(hit)}I", *hit), bytes(vs * len(hit)))

    @staticmethod
    def _packed(entries) -> list[tuple[int, bytes, bytes]]:
        """(id, mac, addr20) -> (id, mac, the 32-byte Vif/Peer value with the valid flag)."""
        pack = _ENTITY.pack
        return [(i, m, pack(i, m, abi.F_VALID, a)) for i, m, a in entries]

    def add_vifs(self, vifs: Iterable[tuple[int, bytes, bytes]]) -> None:
        """Install local VIFs given as (vif_id, mac, addr20); their addresses win over peers'."""
        vifs = self._packed(vifs)
        if not vifs:
            return
        macs = b"".join(m + b"\0\0" for _, m, _ in vifs)
        vals = b"".join(v for _, _, v in vifs)
        self.vif_mac.update_batch_raw(macs, vals)
        self.vif_id.update_batch_raw(struct.pack(f"<{len(vifs)}I", *(i for i, _, _ in vifs)), vals)
        self.by_addr.update_batch_raw(b"".join(v[13:16] + b"\0" + v[16:32] for _, _, v in vifs), macs)
        self._fill_slots(self.vifmac_slot, self.vifid_slot, abi.VIF_SLOTS, vifs)

    def add_peers(self, peers) -> None:
        """Install peers given as (peer_id, remac, addr20), batched, or as a `PeerBatch` (packed: the
        fast path for big loads); an address a VIF owns keeps the VIF."""
        if isinstance(peers, PeerBatch) or (isinstance(peers, list) and len(peers) >= BIG):
            batch = peers if isinstance(peers, PeerBatch) else PeerBatch.of(peers)
            if len(batch) >= BIG and _np() is not None:
                self._add_peers_big(batch)
                return
            peers = list(batch.tuples())
        peers = self._packed(peers)
        if not peers:
            return
        _check_ids(i for i, _, _ in peers)
        macs = b"".join(m + b"\0\0" for _, m, _ in peers)
        vals = b"".join(v for _, _, v in peers)
        self.peer_mac.update_batch_raw(macs, vals)
        self.peer_id.update_batch_raw(struct.pack(f"<{len(peers)}I", *(i for i, _, _ in peers)), vals)
        self.by_addr.update_batch_raw(b"".join(v[13:16] + b"\0" + v[16:32] for _, _, v in peers), macs)
        self._fill_slots(self.peermac_slot, None, abi.PEER_SLOTS, peers)
        self._reassert_vif_addrs()

    def _reassert_vif_addrs(self) -> None:
        """Put every VIF's (QPN, GID) -> MAC back in by_addr (VIFs win over peers with the same address)."""
        _, vals, n = bpfsys.map_lookup_batch(self.vif_id.fd, 4, ct.sizeof(abi.Vif), abi.MAX_VIFS)
        vs = ct.sizeof(abi.Vif)
        vifs = [vals[i * vs:(i + 1) * vs] for i in range(n)]
        if vifs:
            self.by_addr.update_batch_raw(b"".join(v[13:16] + b"\0" + v[16:32] for v in vifs),
                                          b"".join(v[4:10] + b"\0\0" for v in vifs))

    def load(self, tables) -> None:
        """Install an oracle `Tables` (xdpoib.wire.oracle): VIFs, peers, partitions, scope."""
        self.add_vifs((v.vif_id, v.mac, v.addr.pack()) for v in tables.vifs)
        self.add_peers((p.peer_id, p.mac, p.addr.pack()) for p in tables.peers)
        self.write_partitions(tables.vlan_pkeys)
        self.set_config(scope=tables.scope, flags=abi.CFG_LEARN_VIFS if tables.learn_vifs else 0)

    def remove_peers(self, peers) -> None:
        """Remove peers given as (peer_id, remac, addr20), batched, or as a `PeerBatch`."""
        if isinstance(peers, PeerBatch) or (isinstance(peers, list) and len(peers) >= BIG):
            batch = peers if isinstance(peers, PeerBatch) else PeerBatch.of(peers)
            if len(batch) >= BIG and _np() is not None:
                self._remove_peers_big(batch)
                return
            peers = list(batch.tuples())
        peers = [(i, bytes(m), bytes(a)) for i, m, a in peers]
        _check_ids(i for i, _, _ in peers)
        self._clear_slots(self.peermac_slot, None, abi.PEER_SLOTS, peers)
        self.peer_mac.delete_batch_raw(b"".join(m + b"\0\0" for _, m, _ in peers))
        self.peer_id.zero_raw(struct.pack(f"<{len(peers)}I", *(i for i, _, _ in peers)))
        self.by_addr.delete_batch_raw(b"".join(a[1:4] + b"\0" + a[4:20] for _, _, a in peers))
        self._reassert_vif_addrs()

    # ---- big loads: packed with numpy, the two hashes and the id array written by three threads at once

    def _add_peers_big(self, b: PeerBatch) -> None:
        np = _np()
        n = len(b)
        ids = np.frombuffer(b.ids, "<u4")
        _check_ids_np(ids)
        macs = np.frombuffer(b.macs, np.uint8).reshape(n, 6)
        addrs = np.frombuffer(b.addrs, np.uint8).reshape(n, 20)
        vals = np.zeros((n, 32), np.uint8)                  # struct xdpoib_peer
        vals[:, 0:4] = ids.view(np.uint8).reshape(n, 4)
        vals[:, 4:10] = macs
        vals[:, 10] = abi.F_VALID
        vals[:, 12:32] = addrs
        mackeys = np.zeros((n, 8), np.uint8)
        mackeys[:, :6] = macs
        addrkeys = _addr_keys(np, addrs)
        v = vals.tobytes()
        mk = mackeys.tobytes()
        _parallel((self.peer_mac.update_batch_raw, mk, v), (self.peer_id.update_batch_raw, b.ids, v),
                  (self.by_addr.update_batch_raw, addrkeys.tobytes(), mk))
        slot = _mac_slots(np, macs) & (abi.PEER_SLOTS - 1)
        _, first = np.unique(slot[::-1], return_index=True)           # the last entry wins a slot
        last = n - 1 - first
        self.peermac_slot.update_batch_raw(slot[last].astype("<u4").tobytes(), vals[last].tobytes())
        self._reassert_vif_addrs()

    def _remove_peers_big(self, b: PeerBatch) -> None:
        np = _np()
        n = len(b)
        ids = np.frombuffer(b.ids, "<u4")
        _check_ids_np(ids)
        macs = np.frombuffer(b.macs, np.uint8).reshape(n, 6)
        addrs = np.frombuffer(b.addrs, np.uint8).reshape(n, 20)
        nslots, vs = abi.PEER_SLOTS, ct.sizeof(abi.Peer)
        slot = _mac_slots(np, macs) & (nslots - 1)
        _, raw, got = bpfsys.map_lookup_batch(self.peermac_slot.fd, 4, vs, nslots)
        rows = np.frombuffer(raw, np.uint8).reshape(got, vs)
        ok = slot < got
        slot, want = slot[ok], macs[ok]
        cur = rows[slot]
        hit = (cur[:, 10] & abi.F_VALID).astype(bool) & (cur[:, 4:10] == want).all(axis=1)
        hits = np.unique(slot[hit]).astype("<u4")
        if len(hits):
            self.peermac_slot.zero_raw(hits.tobytes())
        mackeys = np.zeros((n, 8), np.uint8)
        mackeys[:, :6] = macs
        _parallel((self.peer_mac.delete_batch_raw, mackeys.tobytes()), (self.peer_id.zero_raw, b.ids),
                  (self.by_addr.delete_batch_raw, _addr_keys(np, addrs).tobytes()))
        self._reassert_vif_addrs()

    def peer_count(self) -> int:
        """Peers in the maps: valid entries of the id array (what RX finds; one batched read)."""
        vs = ct.sizeof(abi.Peer)
        _, raw, n = bpfsys.map_lookup_batch(self.peer_id.fd, 4, vs, abi.MAX_PEERS)
        np = _np()
        if np is not None:
            return int(np.count_nonzero(np.frombuffer(raw, np.uint8).reshape(n, vs)[:, 10] & abi.F_VALID))
        return sum(1 for i in range(n) if raw[i * vs + 10] & abi.F_VALID)

    def remove_vifs(self, vifs: Iterable[tuple[int, bytes, bytes]]) -> None:
        """Remove VIFs given as (vif_id, mac, addr20), batched."""
        vifs = [(i, bytes(m), bytes(a)) for i, m, a in vifs]
        if not vifs:
            return
        self._clear_slots(self.vifmac_slot, self.vifid_slot, abi.VIF_SLOTS, vifs)
        self.vif_mac.delete_batch_raw(b"".join(m + b"\0\0" for _, m, _ in vifs))
        self.vif_id.delete_batch_raw(struct.pack(f"<{len(vifs)}I", *(i for i, _, _ in vifs)))
        self.by_addr.delete_batch_raw(b"".join(a[1:4] + b"\0" + a[4:20] for _, _, a in vifs))

    def set_group(self, mgid: bytes, group_id: int) -> None:
        """Map an MGID to a group id."""
        self.group.set(abi.MgidKey(mgid=(ct.c_uint8 * 16)(*mgid)), abi.Group(group_id=group_id))

    def remove_group(self, mgid: bytes) -> bool:
        """Forget an MGID (a group the agent left); False if it was not there."""
        return self.group.delete(abi.MgidKey(mgid=(ct.c_uint8 * 16)(*mgid)))

    @staticmethod
    def _partition_slots(vlan_pkeys: dict[int, int]) -> tuple[dict[int, int], dict[int, int]]:
        """VID -> P_Key, and P_Key & 0x7fff -> the smallest VID mapping it (what the two arrays hold)."""
        by_pkey: dict[int, int] = {}
        for vid, pkey in sorted(vlan_pkeys.items()):
            by_pkey.setdefault(pkey & 0x7FFF, vid)
        return dict(vlan_pkeys), by_pkey

    def set_partitions(self, vlan_pkeys: dict[int, int]) -> None:
        """Install VID -> P_Key (and P_Key -> the smallest VID mapping it) for every partition, leaving
        the other slots as they are."""
        vlans, pkeys = self._partition_slots(vlan_pkeys)
        for vid, pkey in sorted(vlans.items()):
            self.vlan.set(vid, abi.Vlan(pkey=pkey, flags=abi.F_VALID))
        for pk, vid in pkeys.items():
            self.pkey.set(pk, abi.Pkey(vid=vid, flags=abi.F_VALID))

    def write_partitions(self, vlan_pkeys: dict[int, int]) -> None:
        """Every VID and P_Key slot written with its final value in one batched pass each (no slot is
        ever cleared first: programs running meanwhile, a restart's, see the old or the new mapping)."""
        import numpy as np

        for m, n, pairs in zip((self.vlan, self.pkey), (abi.MAX_VLANS, abi.MAX_PKEYS),
                               self._partition_slots(vlan_pkeys), strict=True):
            vals = np.zeros((n, 4), np.uint8)          # struct Vlan / Pkey: u16 value, u8 flags, u8 reserved
            if pairs:
                idx = np.fromiter(pairs, np.int64, len(pairs))
                words = np.fromiter(pairs.values(), np.int64, len(pairs))
                vals[idx, 0] = words & 0xFF
                vals[idx, 1] = words >> 8
                vals[idx, 2] = abi.F_VALID
            m.update_batch_raw(np.arange(n, dtype="<u4").tobytes(), vals.tobytes())

    def clear_partitions(self) -> None:
        """Mark every VID and P_Key slot unused."""
        self.write_partitions({})

    def set_config(self, report_interval_ns: int = 0, scope: int = 2, flags: int = 0) -> None:
        """Set the datapath configuration (flags: abi.CFG_LEARN_VIFS hands frames from unknown
        source MACs to the agent instead of dropping them)."""
        self.config.set(0, abi.Config(report_interval_ns=report_interval_ns, scope=scope, flags=flags))

    def clear(self) -> None:
        """Empty every table (entities, groups, partitions, rate limiter untouched)."""
        for m in (self.vif_mac, self.vif_id, self.peer_mac, self.peer_id, self.by_addr, self.group):
            m.clear()
        for cache, n in ((self.vifmac_slot, abi.VIF_SLOTS), (self.vifid_slot, abi.VIF_SLOTS),
                         (self.peermac_slot, abi.PEER_SLOTS)):
            cache.update_batch_raw(struct.pack(f"<{n}I", *range(n)), bytes(ct.sizeof(cache.value_type) * n))
        self.clear_partitions()

    def counters(self, direction: abi.Direction) -> abi.Stats:
        """Return the counters of one direction, summed over CPUs."""
        per = self.stats.get(int(direction)) or []
        total = abi.Stats()
        for s in per:
            total.packets += s.packets
            total.bytes += s.bytes
            for i in range(5):
                total.verdicts[i] += s.verdicts[i]
            for i in range(abi.KIND_SLOTS):
                total.kinds[i] += s.kinds[i]
            for i in range(abi.DROP_SLOTS):
                total.drops[i] += s.drops[i]
        return total

    def report(self) -> dict[str, dict]:
        """Every direction's counters in the form `status -j` shows and the exporter serves (one place turns
        BPF counters into it): {"tx"|"rx": {"packets", "bytes", one key per XDP action ("aborted", "drop",
        "pass", "tx", "redirect"), "kinds": {kind: n}, "drops": {reason: n, zeros left out}}}."""
        from xdpoib.reasons import Kind, counts

        out = {}
        for d in abi.Direction:
            c = self.counters(d)
            out[d.name.lower()] = {
                "packets": int(c.packets), "bytes": int(c.bytes),
                **{a.name.lower(): int(c.verdicts[a]) for a in abi.XdpAction},
                "kinds": {k.name.lower(): int(c.kinds[k]) for k in Kind if k < abi.KIND_SLOTS},
                "drops": counts({i: n for i, n in enumerate(c.drops) if n}),
            }
        return out

    def reset_counters(self) -> None:
        """Zero the counters."""
        for d in abi.Direction:
            self.stats.set(int(d), abi.Stats())
