"""``llavaseg.atomic``: the one temp-file-and-rename writer every result, checkpoint and weight file goes through."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llavaseg.atomic import atomic_write, atomic_write_text


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    atomic_write_text(target, "old")

    def half_then_crash(tmp: Path) -> None:
        tmp.write_text("ne")
        raise KeyboardInterrupt  # a kill mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_crash)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_new_files_are_readable_per_umask_and_parents_are_created(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er" / "weights.bin"
    previous = os.umask(0o022)
    try:
        atomic_write(target, lambda tmp: tmp.write_bytes(b"\x00\x01"))
    finally:
        os.umask(previous)
    assert target.read_bytes() == b"\x00\x01"
    assert target.stat().st_mode & 0o777 == 0o644  # mkstemp alone would give 0600


def test_suffix_reaches_writers_that_infer_the_format(tmp_path: Path) -> None:
    seen = []
    atomic_write(tmp_path / "mask.png", lambda tmp: (seen.append(tmp.suffix), tmp.write_bytes(b"x")), suffix=".png")
    assert seen == [".png"]
