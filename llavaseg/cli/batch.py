"""``llavaseg segment`` over many images: models loaded once, batched, resumable, every file written atomically.

Output folder::

    masks/<name>.png        one mask per (image, query) (white = object)
    overlays/<name>.png     the mask over the image
    results.jsonl           one SegmentationResult per line (with its mask as COCO RLE), appended per batch
    provenance.json         what produced them (versions, components, templates)

A line is keyed by the image's bytes, the query and the run's configuration (components, route, templates), so a
re-run skips what is done, recomputes what changed, and refuses a folder that holds another configuration's
results (they would be silently mixed otherwise).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from llavaseg.atomic import atomic_write, atomic_write_text
from llavaseg.bench.jsonl import append_jsonl, read_jsonl
from llavaseg.cli.inputs import SegmentJob
from llavaseg.errors import InputError, LlavasegError
from llavaseg.results import SegmentationResult

__all__ = ["SegmentRecord", "job_key", "run_jobs"]

logger = logging.getLogger(__name__)


class SegmentRecord(SegmentationResult):
    """One line of ``results.jsonl``: the result plus what it answers and where its files are."""

    name: str
    image: str
    key: str
    config: str
    mask_file: str = ""
    overlay_file: str = ""
    error: str | None = None


def job_key(job: SegmentJob) -> str:
    """The image's bytes and the query (the run configuration is checked separately)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(job.image.read_bytes())
    digest.update(b"\0" + job.query.encode("utf-8"))
    return digest.hexdigest()


def _config_of(segmenter) -> str:
    provenance = segmenter.provenance()
    blob = json.dumps({"route": provenance.route, "components": provenance.components,
                       "templates": provenance.templates, "untrained": provenance.untrained}, sort_keys=True)
    return hashlib.blake2b(blob.encode(), digest_size=12).hexdigest()


def _prepare(out_dir: Path) -> list[SegmentRecord]:
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir} is a file; for many images give a folder")
    try:
        (out_dir / "masks").mkdir(parents=True, exist_ok=True)
        (out_dir / "overlays").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot write to --out {out_dir}: {exc.strerror}") from None
    return read_jsonl(out_dir / "results.jsonl", SegmentRecord)


def _write_batch(out_dir: Path, jobs: list[SegmentJob], keys: list[str], config: str, segmenter) -> list[SegmentRecord]:
    from llavaseg.images import load_image
    from llavaseg.overlay import mask_image, overlay

    images = [load_image(job.image) for job in jobs]
    results = segmenter(images, [job.query for job in jobs])
    records = []
    for job, key, image, result in zip(jobs, keys, images, results):
        mask_file, overlay_file = f"masks/{job.name}.png", f"overlays/{job.name}.png"
        atomic_write(out_dir / mask_file, lambda tmp, r=result: mask_image(r.mask).save(tmp, format="PNG"), suffix=".png")
        atomic_write(out_dir / overlay_file, lambda tmp, r=result, i=image: overlay(i, r.mask).save(tmp, format="PNG"),
                     suffix=".png")
        records.append(SegmentRecord(**result.model_dump(exclude={"provenance", "mask"}), mask=result.mask,
                                     name=job.name, image=str(job.image), key=key, config=config,
                                     mask_file=mask_file, overlay_file=overlay_file))
    return records


def run_jobs(jobs: list[SegmentJob], out_dir: Path, make_segmenter: Callable[[], object], batch_size: int) -> int:
    """Segment every job not yet in ``out_dir`` (see the module docstring); returns the exit status."""
    done = {record.key: record for record in _prepare(out_dir)}
    keys = [job_key(job) for job in jobs]
    segmenter = make_segmenter()
    config = _config_of(segmenter)
    other = sorted({record.config for record in done.values()} - {config})
    if other:
        raise InputError(f"{out_dir} holds results made with another configuration (components, route or "
                         "templates); use a new --out")
    atomic_write_text(out_dir / "provenance.json", segmenter.provenance().model_dump_json(indent=2) + "\n")
    pending = [(job, key) for job, key in zip(jobs, keys) if key not in done]
    if len(pending) < len(jobs):
        logger.info("resuming: %d of %d images already done", len(jobs) - len(pending), len(jobs))
    failures = 0
    with tqdm(total=len(jobs), initial=len(jobs) - len(pending), desc="segment", unit="image") as bar:
        for start in range(0, len(pending), batch_size):
            chunk = pending[start: start + batch_size]
            try:
                records = _write_batch(out_dir, [j for j, _ in chunk], [k for _, k in chunk], config, segmenter)
            except LlavasegError:  # a bad image in the batch: retry one by one so only it fails
                records = []
                for job, key in chunk:
                    try:
                        records += _write_batch(out_dir, [job], [key], config, segmenter)
                    except LlavasegError as single:
                        failures += 1
                        logger.error("%s: %s", job.image, single)
            append_jsonl(out_dir / "results.jsonl", records)
            bar.update(len(chunk))
    print(f"wrote {len(jobs) - failures} masks to {out_dir / 'masks'} and results to {out_dir / 'results.jsonl'}"
          + (f"; {failures} image(s) failed (see above)" if failures else ""))
    return 0 if not failures else 2
