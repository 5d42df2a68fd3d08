"""The scan: every image of every split decoded once, before anything is trained.

Image folders and CSV lists are untrusted input: a zero-byte or truncated file, one that is
no image at all, one of a pixel mode the pipelines do not read alike, or a PNG whose header
declares a decompression bomb would otherwise stop a run hours in (or take the machine's
memory with it). The scan decodes each file with PIL in a thread pool (the same decoding
the torch pipeline does, so DALI never meets a bad file and never prints its own errors)
and reports every bad file at once:

* none bad: the run goes on;
* some bad: the run stops with one line naming the first and the count, the whole list in
  ``<workdir>/reports/bad-images-<dataset>.txt``; ``--skip-bad-images`` goes on without
  them. The rows left out become part of the dataset's fingerprint, so everything made
  from the reduced data is told apart from what the full data would give.

The result is kept in ``<workdir>/cache/scan-<dataset>.json``, keyed by the dataset's
fingerprint (its bytes) and the pixel limit: the next run reuses it without decoding,
and a skip once accepted there holds for later commands on the same bytes (so `mlfd fuse`
or `mlfd eval` after `mlfd teach --skip-bad-images` see the same data). Datasets held in
memory (npz, MNIST, the embedded demo sets) have no files to scan: their arrays' shape and
dtype are checked when they are read.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..data import formats
from ..data.datasets import Dataset
from ..engine.distributed import on_main
from ..engine.progress import log, progress
from ..errors import MlfdError
from ..storage import staging
from ..workspace import Workspace
from .common import dataset_of

SCAN_VERSION = 1
_CHUNK = 512  # images handed to the thread pool at a time (bounded memory on huge sets)


@dataclass
class BadFile:
    split: str
    row: int  # index into the split's full listing
    path: str
    reason: str


@dataclass
class ScanResult:
    name: str
    images: int
    bad: list[BadFile] = field(default_factory=list)
    cached: bool = False  # taken from the workdir's record, nothing decoded
    skipped: bool = False  # the bad files are left out (this run's flag or an earlier one's)
    listing: str | None = None  # where the list of bad files was written


def record_path(ws: Workspace, name: str) -> Path:
    return ws.root / "cache" / f"scan-{name}.json"


def list_path(ws: Workspace, name: str) -> Path:
    return ws.reports / f"bad-images-{name}.txt"


def has_files(ds: Dataset) -> bool:
    """A dataset of image files (not arrays in memory, not a download still to come)."""
    return ds.pending is None and ds.image_files


def _key(ds: Dataset) -> dict:
    return {"version": SCAN_VERSION, "fingerprint": ds.base_fingerprint(),
            "max_image_pixels": formats.max_image_pixels()}


def _read_record(ws: Workspace, name: str, ds: Dataset) -> dict | None:
    """The workdir's record for this dataset's bytes and pixel limit; None when absent,
    made for other bytes or settings, or malformed (a workdir may come from elsewhere)."""
    try:
        doc = json.loads(record_path(ws, name).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or any(doc.get(k) != v for k, v in _key(ds).items()):
        return None
    sizes = {s: len(ds.load_all(s)) for s in ds.splits()}
    bad = doc.get("bad")
    if not isinstance(bad, list) or not isinstance(doc.get("skip"), bool):
        return None
    for b in bad:
        if not (isinstance(b, dict) and b.get("split") in sizes and isinstance(b.get("row"), int)
                and 0 <= b["row"] < sizes[b["split"]] and isinstance(b.get("reason"), str)):
            return None
    return doc


def _check(path: str, limit: int, size: tuple[int, int] | None) -> str | None:
    """Why this file is bad, or None."""
    try:
        pixels = formats.read_image(path, limit)
    except formats.BadImage as e:
        return e.reason
    if size is not None and pixels.shape[:2] != size:
        return (f"unexpected size ({pixels.shape[1]}x{pixels.shape[0]}, the dataset's "
                f"images are {size[1]}x{size[0]})")
    return None


def _decode_all(name: str, ds: Dataset) -> tuple[int, list[BadFile]]:
    jobs = [(s, i, f) for s in ds.splits() for i, f in enumerate(ds.load_all(s).files or [])]
    limit = formats.max_image_pixels()
    size = tuple(ds.image_size) if ds.fixed_size else None
    bad = []
    # PIL decodes without the GIL: threads keep every core busy on local or network disks.
    workers = min(16, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(workers, thread_name_prefix="mlfd-scan") as pool, \
            progress() as bar:
        task = bar.add_task(f"scan {name}", total=len(jobs), items=0, info="", unit="img")
        for start in range(0, len(jobs), _CHUNK):
            chunk = jobs[start:start + _CHUNK]
            reasons = pool.map(lambda job: _check(job[2], limit, size), chunk)
            for (split, row, path), reason in zip(chunk, reasons, strict=True):
                if reason is not None:
                    bad.append(BadFile(split, row, path, reason))
            bar.update(task, advance=len(chunk), items=start + len(chunk))
    return len(jobs), bad


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _scan_one(ws: Workspace, name: str, skip: bool) -> ScanResult | None:
    ds = dataset_of(ws, name)
    ds.exclude({})  # the scan judges every file, whatever an earlier command left out
    if not has_files(ds):
        return None
    rec = _read_record(ws, name, ds)
    if rec is not None:
        listing = {s: ds.load_all(s).files for s in ds.splits()}
        bad = [BadFile(b["split"], b["row"], listing[b["split"]][b["row"]], b["reason"])
               for b in rec["bad"]]
        res = ScanResult(name, int(rec.get("images", 0)), bad, cached=True,
                         skipped=bool(bad) and (rec["skip"] or skip))
    else:
        images, bad = _decode_all(name, ds)
        res = ScanResult(name, images, bad, skipped=bool(bad) and skip)
    if staging._READ_ONLY["on"]:  # eval and dry runs write nothing
        return res
    if rec is None or res.skipped != rec["skip"]:
        _write_text(record_path(ws, name), json.dumps(dict(
            _key(ds), dataset=name, images=res.images, skip=res.skipped,
            bad=[{"split": b.split, "row": b.row, "reason": b.reason} for b in res.bad]),
            indent=1))
    if res.bad:
        _write_text(list_path(ws, name), _listing_text(res))
        res.listing = str(list_path(ws, name))
    else:
        list_path(ws, name).unlink(missing_ok=True)  # an old list of since-mended files
    return res


def _listing_text(res: ScanResult) -> str:
    head = (f"# {len(res.bad)} bad image(s) of {res.images} in dataset {res.name!r}, found by "
            "mlfd's scan; --skip-bad-images goes on without them\n# split\tfile\treason\n")
    return head + "".join(f"{b.split}\t{b.path}\t{b.reason}\n" for b in res.bad)


def _shown(ds: Dataset, path: str) -> str:
    """A file as the user knows it: from the dataset folder's name on, else in full."""
    base = Path(ds.source)
    if base.exists():
        try:
            return str(Path(path).relative_to(base.parent))
        except ValueError:
            pass
    return path


def _refusal(ws: Workspace, refused: list[ScanResult]) -> str:
    first = refused[0]
    ds = dataset_of(ws, first.name)
    counts = Counter(b.split for b in first.bad)
    where = f"{first.name}/{first.bad[0].split}" if len(counts) == 1 else \
        f"{first.name} ({', '.join(f'{s} {n}' for s, n in counts.items())})"
    n = len(first.bad)
    line = (f"{n} unreadable image{'s' if n > 1 else ''} in {where}, first "
            f"{_shown(ds, first.bad[0].path)} ({first.bad[0].reason}); --skip-bad-images goes "
            f"on without them")
    if first.listing:
        line += f" (all listed in {first.listing})"
    if len(refused) > 1:
        line += "; more in " + ", ".join(f"{r.name} ({len(r.bad)})" for r in refused[1:])
    return line


def _leave_out(ws: Workspace, res: ScanResult) -> None:
    """Exclude the bad rows from the shared dataset; a class left without training images
    would still count in num_classes, so that is refused."""
    ds = dataset_of(ws, res.name)
    rows: dict[str, list[int]] = {}
    for b in res.bad:
        rows.setdefault(b.split, []).append(b.row)
    ds.exclude(rows)
    if "train" in ds.splits():
        left = set(ds.load("train").labels.tolist())
        if gone := [c for i, c in enumerate(ds.classes) if i not in left]:
            raise MlfdError(f"dataset {res.name!r}: without its {len(res.bad)} bad image(s), "
                            f"class {gone[0]!r} has no training images left")


def scan(ws: Workspace, names: list[str], skip_bad_images: bool = False) -> list[ScanResult]:
    """Scan the datasets ``names`` (those of image files); refuse bad files unless they are
    skipped (``skip_bad_images``, or an earlier run's skip of the same bytes), in which case
    they are left out of the datasets from now on. Under torchrun rank 0 decodes and
    writes, and every rank leaves out the same rows."""
    results = on_main(lambda: [r for n in dict.fromkeys(names)
                               if (r := _scan_one(ws, n, skip_bad_images)) is not None])
    refused = [r for r in results if r.bad and not r.skipped]
    if refused:
        raise MlfdError(_refusal(ws, refused))
    for r in results:
        dataset_of(ws, r.name).exclude({})
        if r.skipped:
            _leave_out(ws, r)
            n = len(r.bad)
            why = "--skip-bad-images" if skip_bad_images else "an earlier --skip-bad-images"
            listed = f"; listed in {r.listing}" if r.listing else ""
            log(f"[scan] {r.name}: skipped {n} unreadable image{'s' if n > 1 else ''} of "
                f"{r.images} ({why}{listed})")
        elif not r.cached:
            log(f"[scan] {r.name}: {r.images} images checked")
    return results


def recorded(ws: Workspace, name: str) -> str | None:
    """For a plan, read-only: what the workdir's record says of dataset ``name`` (and its
    skip, applied to the shared dataset as a run would), or None when it has no record
    for these bytes (a run scans first). Nothing is decoded or written."""
    ds = dataset_of(ws, name)
    rec = _read_record(ws, name, ds)
    if rec is None:
        return None
    if rec["bad"] and rec["skip"]:
        rows: dict[str, list[int]] = {}
        for b in rec["bad"]:
            rows.setdefault(b["split"], []).append(b["row"])
        ds.exclude(rows)
        return f"{rec.get('images')} images checked, {len(rec['bad'])} bad left out"
    if rec["bad"]:
        return f"{len(rec['bad'])} bad images: the run stops unless --skip-bad-images"
    return f"{rec.get('images')} images checked"
