"""What makes a cache group trustworthy: its manifest and checksums, the memo of files
already found intact, the record of arrays that failed to decode, and the marks that make
a store mlfd's own.

Damage is caught twice: the manifest (size and crc32 of every file) makes ``status()``
report it, and the crc32c of every inner chunk and of every shard index makes zarr refuse
a damaged chunk on read. ``status()`` re-reads only the files whose stat changed since
they were last found intact (verified.json; local files: size, mtime, ctime and inode;
object stores: size and ETag, else modification time), so repeated checks of a large
cache read no chunk data. A file modified less than ``RACY_NS`` before its check is
checked again next time: coarse file-system clocks may not have moved its mtime. A chunk
that fails its crc32c when read (damage the manifest and the memo did not see: written
damaged, or rewritten where the stat does not show it) drops the memo and is recorded in
damaged.json, which makes ``status()`` say "corrupt" until the group is rebuilt.

Ownership: mlfd's groups carry a fingerprint and its digest in their attributes (plain
zarr writes neither), and ``foreign`` says why a store is not made of such groups only:
`mlfd clean` removes nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import zlib

from ..errors import MlfdError
from ..storage.fingerprint import changes, digest
from .layout import DAMAGED, MANIFEST, VERIFIED, _LocalDir, _RemoteDir

# What zarr/numcodecs raise for damaged bytes: a crc32c mismatch or bad JSON is a
# ValueError, an undecodable blosc frame a RuntimeError, a vanished array a KeyError.
DECODE_ERRORS = (ValueError, RuntimeError, KeyError, TypeError)


def _read_only() -> bool:
    from ..storage import staging

    return staging._READ_ONLY["on"]


def describe_difference(stored: dict, wanted: dict) -> str:
    """``"dtype float16 → float32; views 4 → 8"``: the keys that differ."""
    return changes(stored, wanted, limit=8) or "fingerprint digest differs"


def _as_dir(root) -> _LocalDir | _RemoteDir:
    return root if isinstance(root, (_LocalDir, _RemoteDir)) else _LocalDir(root)


def _attrs(root) -> dict:
    """The group's attributes from its zarr.json; ValueError/KeyError/TypeError if damaged."""
    attrs = json.loads(_as_dir(root).read("zarr.json"))["attributes"]
    if not isinstance(attrs, dict):
        raise TypeError("attributes are not a mapping")
    return attrs


def _file_crc(d, rel: str) -> int:
    crc = 0
    with d.open(rel) as f:  # in blocks: shards are tens of MiB
        while block := f.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return crc


def _manifest(root) -> dict[str, list[int]]:
    d = _as_dir(root)
    return {rel: [st.size, _file_crc(d, rel)] for rel, st in d.files().items()}


def _memo(d, tag: int) -> dict:
    """Files found intact earlier (rel -> stat key), if recorded for this very manifest."""
    try:
        memo = json.loads(d.read(VERIFIED))
        return memo["files"] if memo["manifest"] == tag and isinstance(memo["files"], dict) \
            else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _verify(root) -> str | None:
    """What differs from the manifest written at close (None: every file intact). Files
    whose stat is as when they were last found intact are not read again."""
    d = _as_dir(root)
    try:
        raw = d.read(MANIFEST)
        want = {rel: (int(size), int(crc)) for rel, (size, crc)
                in json.loads(raw)["files"].items()}
    except FileNotFoundError:
        return f"{MANIFEST} missing"
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} unreadable"
    have = d.files(time.time_ns())
    tag = zlib.crc32(raw)
    memo, checked = _memo(d, tag), {}
    for rel, (size, crc) in want.items():
        st = have.get(rel)
        if st is None:
            return f"{rel} missing"
        if st.size != size:
            return f"{rel} size mismatch ({st.size} ≠ {size} bytes)"
        if st.key is None or memo.get(rel) != st.key:
            if _file_crc(d, rel) != crc:
                return f"{rel} checksum mismatch"
            if st.key is None or st.racy:
                continue
        checked[rel] = st.key
    extra = sorted(set(have) - set(want))
    if extra:
        return f"{extra[0]} not in manifest"
    if checked != memo and not _read_only():  # read-only runs (eval, --dry-run) write nothing
        with contextlib.suppress(OSError):  # only a memo: a failed write costs a re-read
            d.write_json(VERIFIED, {"manifest": tag, "files": checked})
    return None


def _may_record() -> bool:
    """Whether this process may write a group's bookkeeping after a failed read: not a
    command that holds no workdir lock (eval, --dry-run); a torchrun rank other than 0
    may, under rank 0's lock (its only reason to be read-only is promotion, done by then)."""
    return not _read_only() or int(os.environ.get("WORLD_SIZE", "1")) > 1  # under torchrun


def _damaged(d) -> dict[str, str]:
    """The arrays recorded in damaged.json (name -> why), {} if none (or unreadable)."""
    try:
        arrays = json.loads(d.read(DAMAGED))["arrays"]
        return dict(arrays) if isinstance(arrays, dict) else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _damage_note(d) -> str | None:
    """Why the group must be rebuilt after a read failed (None: no read failed)."""
    if not d.exists(DAMAGED):
        return None
    arrays = _damaged(d)
    if not arrays:
        return f"{DAMAGED} unreadable"
    name, why = next(iter(arrays.items()))
    return f"array {name} failed to decode when read ({why})"


def record_damage(d, array: str, why: str) -> bool:
    """A chunk of ``array`` failed its checksum when read although the group was checked:
    drop the memo of intact files (the next check reads every byte again) and record the
    array in damaged.json, which keeps status() "corrupt" until a rebuild replaces the
    group (the manifest may match damaged bytes: they were damaged before it was made).
    False where nothing could be recorded: this process may not write (eval, --dry-run),
    or the write failed."""
    if not _may_record():
        return False
    recorded = True
    try:  # a failed write (a full disk) must not hide the corrupt chunk's own error
        d.write_json(DAMAGED, {"arrays": {**_damaged(d), array: why}})
    except (OSError, MlfdError):
        recorded = False
    with contextlib.suppress(OSError, MlfdError):
        d.delete(VERIFIED)
    return recorded


def foreign(d, judge) -> str | None:
    """Why the store (a ``.zarr`` directory of ``stores_under``) is not one of mlfd's;
    None when it is: every file in it lies in a ``<dataset>/<split>`` group whose
    attributes carry a fingerprint and its digest (what mlfd writes, plain zarr does not),
    and ``judge(group, fingerprint)`` (None, or why not) takes each group as its own."""
    if d.is_link():
        return "a symbolic link (mlfd never makes one)"
    groups: set[str] = set()
    for rel in d.listing():
        parts = rel.split("/")
        if len(parts) < 3:  # mlfd writes nothing beside its groups
            return f"{rel} is not in a cache group"
        groups.add("/".join(parts[:2]))
    if not groups:
        return "no cache group in it"
    for g in sorted(groups):
        try:
            attrs = _attrs(d.sub(g))
        except (OSError, ValueError, KeyError, TypeError):
            return f"{g}: no readable zarr.json"
        fp = attrs.get("fingerprint")
        if not isinstance(fp, dict) or attrs.get("fingerprint_digest") != digest(fp):
            return f"{g}: no mlfd fingerprint"
        if why := judge(g, fp):
            return f"{g}: {why}"
    return None
