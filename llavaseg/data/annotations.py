"""The two annotation files that may sit beside a ReasonSeg-format split, with one schema each.

* ``stages.jsonl``: the **ground-truth stages**, i.e. what the two chain-of-thought stages should answer for
  each (image, text): the simple target description and its visual attributes. The tiny world writes them
  (it knows every referent); the oracle route, adapter training on ground-truth stages (``stage_source =
  "teacher"``) and the ``[SEG]`` recipes read them.
* ``dialogue.jsonl``: ordinary questions about the split's images with short reference answers, for the
  dialogue-preservation probe.

Writer and readers share the pydantic records below, so a field renamed on one side fails loudly on the other.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from llavaseg.atomic import atomic_write_text
from llavaseg.errors import DatasetFormatError

__all__ = ["STAGES_FILE", "DIALOGUE_FILE", "StageRecord", "DialogueRecord", "read_records", "write_records",
           "GroundTruthStages"]

STAGES_FILE = "stages.jsonl"
DIALOGUE_FILE = "dialogue.jsonl"

RecordT = TypeVar("RecordT", bound=BaseModel)


class StageRecord(BaseModel):
    """One line of ``stages.jsonl``: the ground-truth stage outputs for one text of one image."""

    model_config = ConfigDict(frozen=True)

    image: str  # the image's file stem within the split folder
    text_index: int = 0
    text: str
    is_sentence: bool = False
    description: str
    attributes: dict[str, str]
    family: str | None = None  # the tiny world's query family (informational)


class DialogueRecord(BaseModel):
    """One line of ``dialogue.jsonl``: a question about an image and its reference answer.

    ``image`` is a path relative to the file's folder, or a bare file stem (the tiny world's) whose suffix is
    found on disk.
    """

    model_config = ConfigDict(frozen=True)

    image: str
    question: str
    answer: str


def read_records(path: Path | str, model: type[RecordT]) -> list[RecordT]:
    """Every non-blank line of ``path`` as ``model``; a bad line is a one-line error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"annotation file not found: {path}")
    records: list[RecordT] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(model.model_validate(json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DatasetFormatError(f"{path} line {number}: invalid JSON ({exc.msg})") from None
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"]) or "record"
            raise DatasetFormatError(f"{path} line {number}: field '{where}': {error['msg']}") from None
    return records


def write_records(path: Path | str, records: Iterable[BaseModel]) -> None:
    """Write records as JSON lines, atomically (field order as declared, non-ASCII kept)."""
    body = "".join(json.dumps(record.model_dump(mode="json"), ensure_ascii=False) + "\n" for record in records)
    atomic_write_text(path, body)


class GroundTruthStages:
    """The ground-truth stages of one split, looked up by (image file stem, query text)."""

    def __init__(self, records: Iterable[StageRecord], source: str) -> None:
        self.records = {(record.image, record.text): record for record in records}
        self.source = source

    @classmethod
    def from_file(cls, path: Path | str) -> GroundTruthStages:
        path = Path(path)
        if not path.is_file():
            raise DatasetFormatError(f"ground-truth stages not found: {path} (tiny-world splits have {STAGES_FILE})")
        return cls(read_records(path, StageRecord), str(path))

    @classmethod
    def for_dataset(cls, dataset: Any) -> GroundTruthStages:
        """``stages.jsonl`` beside a ReasonSeg-format split (what the tiny-world generator writes)."""
        split_dir = getattr(dataset, "split_dir", None)
        if split_dir is None:
            raise DatasetFormatError(f"ground-truth stages need a ReasonSeg-format split with {STAGES_FILE}")
        return cls.from_file(Path(split_dir) / STAGES_FILE)

    def lookup(self, query: Any) -> StageRecord:
        """The record of a :class:`~llavaseg.data.base.SegQuery` (its ``sample_id`` ends in the image stem)."""
        name = str(query.sample_id).rsplit("/", 1)[-1]
        try:
            return self.records[(name, query.text)]
        except KeyError:
            raise DatasetFormatError(f"{self.source}: no stage record for image {name!r} text {query.text!r}") from None
