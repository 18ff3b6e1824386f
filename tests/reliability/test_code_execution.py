"""No file a user hands us runs code: refer's refs pickles are read as plain data, weights through
``weights_only`` or safetensors. Each crafted file would create a marker file if it ran."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from refer_files import write_refer

from llavaseg.cli.bench import main as bench
from llavaseg.data.refcoco import RefCocoDataset
from llavaseg.errors import CheckpointMismatchError, DatasetFormatError


class _Payload:
    """Unpickling this calls ``os.system`` to create ``marker``."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_refs_pickle_runs_nothing(tmp_path, capsys) -> None:
    marker = tmp_path / "MARKER"
    root = write_refer(tmp_path / "refer", refs_payload=pickle.dumps([_Payload(marker)]))
    with pytest.raises(DatasetFormatError, match=r"refusing refs file .*posix\.system|refusing refs file .*os\.system"):
        RefCocoDataset(root, "refcoco", "unc", "val")
    assert bench(["refcoco", "--data", str(root), "--preset", "tiny", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing refs file" in err[0] and "refs(<split_by>).json" in err[0]
    assert not marker.exists()
    # the plain data refer ships still loads (protocol 2, as Python 2 wrote it)
    plain = write_refer(tmp_path / "plain", refs_payload=pickle.dumps(
        [{"ref_id": 7, "ann_id": 100, "image_id": 1, "category_id": 1, "split": "val",
          "sentences": [{"sent": "left dog", "sent_id": 70}]}], protocol=2))
    assert [q.text for q in RefCocoDataset(plain, "refcoco", "unc", "val").queries()] == ["left dog"]


def test_pickled_weights_with_code_are_refused_unread(tmp_path) -> None:
    from llavaseg.models.components import build_sam, build_text_encoder

    marker = tmp_path / "MARKER"
    torch.save({"image_encoder.patch_embed.proj.weight": _Payload(marker)}, tmp_path / "sam.pth")
    with pytest.raises(CheckpointMismatchError, match="refused unread"):
        build_sam("vit_b", str(tmp_path / "sam.pth"), device="cpu")
    torch.save({"positional_embedding": _Payload(marker)}, tmp_path / "clip.bin")
    with pytest.raises(CheckpointMismatchError, match="refused unread"):
        build_text_encoder("ViT-B-32", str(tmp_path / "clip.bin"), device="cpu")
    assert not marker.exists()
