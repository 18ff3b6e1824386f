"""A LISA release folder in LISA's exact saved layout, run end to end as LISA runs it.

The folder (``tests/lisa_release_files.py``): bf16 ``pytorch_model-*.bin`` shards with their index, LISA's
``config.json``, a real SentencePiece ``tokenizer.model`` with the tokenizer files transformers 4.31 writes
(``[SEG]``, ``<im_start>``, ``<im_end>`` added), no ``tokenizer.json``, no CLIP tower. The reference for LISA's
prompt ids is LISA's ``tokenizer_image_token`` over transformers 4.31's slow LLaMA tokenizer rules (checked
against transformers 4.31.0 itself, see the helper's docstring).
"""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from lisa_release_files import (
    IMAGE,
    IMAGE_TOKEN_INDEX,
    lisa_chat_prompt,
    lisa_config,
    lisa_state_dict,
    lisa_val_prompt,
    round_to_bf16_,
    slow_llama_ids,
    tokenizer_image_token,
    train_sentencepiece,
    write_lisa_release,
)
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from llavaseg.errors import CheckpointMismatchError, UnsupportedError
from llavaseg.models.components import build_sam
from llavaseg.seg_token.inference import predict, render, request_text, teacher_forced_pass
from llavaseg.seg_token.lisa_checkpoint import (
    LLAVA_V1_SYSTEM,
    lisa_input_ids,
    llava_v1_chat_template,
    load_lisa_checkpoint,
)
from llavaseg.seg_token.model import text_hidden_fcs
from llavaseg.seg_token.prompts import TEACHER_FORCED_ANSWER

sentencepiece = pytest.importorskip("sentencepiece")
torch.set_num_threads(1)

HIDDEN, VISION = 32, 24
QUERIES = [("the red circle", "short"), ("the object at the top left which is small.", "long")]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The release folder, a CLIP vision folder, the reference modules and the loaded model."""
    root = tmp_path_factory.mktemp("lisa_release")
    model_bytes = train_sentencepiece()
    sp = sentencepiece.SentencePieceProcessor(model_proto=model_bytes)
    vocab = sp.get_piece_size() + 3
    sam = build_sam("tiny", None, device="cpu")
    torch.manual_seed(0)
    llama = round_to_bf16_(LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=2048)).eval())
    projector = round_to_bf16_(torch.nn.Linear(VISION, HIDDEN))
    fcs = round_to_bf16_(text_hidden_fcs(HIDDEN, sam.prompt_dim)).eval()
    decoder = {k: (v + 0.01).to(torch.bfloat16).float() for k, v in sam.sam.mask_decoder.state_dict().items()}
    state = lisa_state_dict(llama, projector, fcs, sam, decoder)
    config = lisa_config(hidden=HIDDEN, layers=2, heads=4, intermediate=64, vision=VISION, vocab=vocab,
                         out_dim=sam.prompt_dim)
    folder = write_lisa_release(root / "LISA-tiny-v1", state, config, model_bytes)
    clip_dir = root / "clip"
    torch.manual_seed(1)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=VISION, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=32, patch_size=8)).eval()
    clip.save_pretrained(str(clip_dir))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(clip_dir))
    added = json.loads((folder / "added_tokens.json").read_text())
    return {"dir": folder, "clip_dir": clip_dir, "sam": sam, "sp": sp, "added": added, "state": state,
            "config": config, "llama": llama, "projector": projector, "fcs": fcs, "clip": clip,
            "model": load_lisa_checkpoint(folder, clip_dir, sam)}


def _lisa_ids(release, prompt: str) -> list[int]:
    """What LISA feeds its model for ``prompt``: ``tokenizer_image_token`` with LISA's tokenizer."""
    return tokenizer_image_token(prompt, lambda chunk: slow_llama_ids(chunk, release["sp"], release["added"]))


def _collapse_image(ids: list[int], image_id: int) -> list[int]:
    """Our ids with each run of ``<image>`` placeholders back to LISA's single ``IMAGE_TOKEN_INDEX``."""
    out: list[int] = []
    for token in ids:
        if token != image_id:
            out.append(token)
        elif not out or out[-1] != IMAGE_TOKEN_INDEX:
            out.append(IMAGE_TOKEN_INDEX)
    return out


def _image(height: int = 40, width: int = 60) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)


def test_release_folder_has_lisas_layout(release):
    names = {path.name for path in release["dir"].iterdir()}
    assert names == {"pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
                     "pytorch_model.bin.index.json", "config.json", "generation_config.json", "tokenizer.model",
                     "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"}
    assert release["added"] == {"[SEG]": 700, "<im_start>": 701, "<im_end>": 702}
    assert release["config"]["vocab_size"] == 703 == len(release["model"].tokenizer) - 1  # + our <image>
    assert LLAVA_V1_SYSTEM.startswith("A chat between a curious human") and LLAVA_V1_SYSTEM.endswith(
        "answers to the human's questions.")


@pytest.mark.parametrize(("query", "style"), QUERIES)
def test_teacher_forced_prompt_is_lisas_validation_text_and_ids(release, query, style):
    model = release["model"]
    text = render(model.processor, request_text(query, style), TEACHER_FORCED_ANSWER)
    lisa_prompt = lisa_val_prompt(query, is_sentence=style == "long")
    assert text == lisa_prompt
    image_id = model.tokenizer.convert_tokens_to_ids(IMAGE)
    ids = model.processor(images=[_image()], text=[text], return_tensors="pt")["input_ids"][0].tolist()
    assert ids.count(image_id) == 16  # (32 / 8) ** 2 CLIP patches, LISA's 256 at 224 px
    assert _collapse_image(ids, image_id) == _lisa_ids(release, lisa_prompt) == lisa_input_ids(model.tokenizer,
                                                                                               lisa_prompt)


def test_lisa_tokenisation_of_the_validation_prompt_piece_by_piece(release):
    """What 4.31 does to LISA's prompt, written out: no space before ``<im_start>``, ``<im_end>`` eats the
    ``"\\n "`` after the image, ``ASSISTANT:`` predicts ``[SEG]``, the ``"."`` after it is a fresh piece."""
    model, sp = release["model"], release["sp"]
    ids = lisa_input_ids(model.tokenizer, lisa_val_prompt("the red circle", is_sentence=False))
    head = sp.encode(LLAVA_V1_SYSTEM + " USER:")
    tail = sp.encode("What is the red circle in this image? Please output segmentation mask. ASSISTANT:")
    assert ids == [1, *head, 701, IMAGE_TOKEN_INDEX, 702, *tail, 700, *sp.encode("."), 2]
    assert sp.id_to_piece(tail[0]) == "\u2581What" and sp.id_to_piece(tail[-1]) == ":"


def test_leading_space_of_lisas_validation_prompt_is_kept(release):
    """Without ``<im_start>``/``<im_end>`` nothing strips the ``"\\n "`` after the image: the space gives
    ``"\u2581What"`` (ValDataset) where ``chat.py``'s ``"\\nWhat"`` gives ``"What"``."""
    model, sp = release["model"], release["sp"]
    val = lisa_val_prompt("the red circle", is_sentence=False, im_start_end=False)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": request_text(
        "the red circle", "short")}]}, {"role": "assistant", "content": [{"type": "text", "text": "[SEG]."}]}]
    rendered = model.processor.apply_chat_template(messages, chat_template=llava_v1_chat_template(False),
                                                   tokenize=False)
    assert rendered == val
    ids = lisa_input_ids(model.tokenizer, val)
    assert ids == _lisa_ids(release, val)
    after = ids[ids.index(IMAGE_TOKEN_INDEX) + 1:][:3]
    assert [sp.id_to_piece(i) for i in after] == ["\u2581", "<0x0A>", "\u2581What"]
    chat = lisa_input_ids(model.tokenizer, lisa_chat_prompt("What is it?", im_start_end=False))
    assert sp.id_to_piece(chat[chat.index(IMAGE_TOKEN_INDEX) + 3]) == "What"


@pytest.mark.parametrize("prompt", [
    "", IMAGE, f"{IMAGE}\n hi", f"hi {IMAGE}", f" {IMAGE} {IMAGE} ", f"<im_start>{IMAGE}<im_end>\n [SEG] .",
    "USER: [SEG]</s>USER: <im_start> <image> <im_end>\tWhat", "a  [SEG]  b\n\n[SEG]", "<s> x </s> <unk> 12 é",
])
def test_chunkwise_tokenisation_equals_tokenizer_image_token(release, prompt):
    assert lisa_input_ids(release["model"].tokenizer, prompt) == _lisa_ids(release, prompt)


def _lisa_seg_embedding(release, image: np.ndarray, prompt: str) -> torch.Tensor:
    """LISA's ``model_forward(inference=True)``: CLIP layer -2 patches -> mm_projector spliced in place of the
    -200, LLaMA's last (normed) hidden states, the ``input_ids[:, 1:] == [SEG]`` mask shifted by the image's
    extra positions, ``text_hidden_fcs``."""
    from PIL import Image

    ids = _lisa_ids(release, prompt)
    pixels = CLIPImageProcessor.from_pretrained(str(release["clip_dir"]))(Image.fromarray(image),
                                                                          return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        patches = release["clip"](pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        features = release["projector"](patches)[0]
        at = ids.index(IMAGE_TOKEN_INDEX)
        embed = release["llama"].get_input_embeddings()
        rows = torch.cat([embed(torch.tensor(ids[:at])), features, embed(torch.tensor(ids[at + 1:]))])
        hidden = release["llama"].model(inputs_embeds=rows[None]).last_hidden_state[0]
        seg = torch.tensor(ids[1:] + [0]) == release["added"]["[SEG]"]
        mask = torch.cat([torch.zeros(features.shape[0] - 1, dtype=torch.bool), seg])
        return release["fcs"](hidden[mask])


@pytest.mark.parametrize(("query", "style"), QUERIES)
def test_seg_embedding_equals_lisas_forward(release, query, style):
    model, image = release["model"], _image()
    passes = teacher_forced_pass(model, [image], [request_text(query, style)])
    with torch.no_grad():
        ours = model.project(passes[0].hidden)
    theirs = _lisa_seg_embedding(release, image, lisa_val_prompt(query, is_sentence=style == "long"))
    assert ours.shape == theirs.shape == (1, release["sam"].prompt_dim)
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("protocol", ["teacher-forced", "generate"])
def test_predict_feeds_lisas_ids_and_returns_masks(release, protocol):
    model = release["model"]
    seen: list[list[int]] = []
    hook = model.llava.register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.append(kwargs["input_ids"][0].tolist()), with_kwargs=True)
    try:
        result = predict(model, [_image(40, 60)], ["the red circle"], protocol=protocol, style="short",
                         max_new_tokens=3)[0]
    finally:
        hook.remove()
    text = request_text("the red circle", "short")
    expected = (lisa_val_prompt("the red circle", is_sentence=False) if protocol == "teacher-forced"
                else lisa_chat_prompt(text))  # chat.py's "\n" + text: same ids as ValDataset's "\n " here
    image_id = model.tokenizer.convert_tokens_to_ids(IMAGE)
    assert _collapse_image(seen[0], image_id) == _lisa_ids(release, expected)
    assert result.masks.shape[1:] == (40, 60) and result.masks.dtype == bool
    assert result.masks.shape[0] == (1 if protocol == "teacher-forced" else len(result.scores))


def test_decoding_follows_lisas_tokenizer(release):
    tokenizer = release["model"].tokenizer
    ids = tokenizer("Sure, it is [SEG].", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "Sure, it is [SEG] ."  # transformers 4.31's output for these ids


# --------------------------------------------------------------------------------- frozen SAM, bf16 rounding
def test_fp32_copy_of_bf16_weights_matches_the_frozen_sam(release, tmp_path):
    """LISA's saved SAM tensors equal SAM ViT-H only after bf16 rounding; an fp32 copy of them must load."""
    rounded = {k: v.to(torch.bfloat16).float() for k, v in release["state"].items()}
    reference = release["sam"].sam.state_dict()
    assert any(not torch.equal(rounded[k], reference[k.removeprefix("model.visual_model.")]) for k in rounded
               if k.startswith("model.visual_model.image_encoder."))  # a plain fp32 comparison would refuse it
    folder = write_lisa_release(tmp_path / "fp32", rounded, release["config"],
                                (release["dir"] / "tokenizer.model").read_bytes(), dtype=torch.float32)
    model = load_lisa_checkpoint(folder, release["clip_dir"], release["sam"])
    assert model.seg_token_id == 700


def test_another_sam_is_refused_even_after_bf16_rounding(release):
    other = build_sam("tiny", None, device="cpu")
    with torch.no_grad():
        other.sam.image_encoder.neck[0].weight.add_(0.05)
    with pytest.raises(CheckpointMismatchError, match=r"frozen SAM .* even after rounding both to bf16") as info:
        load_lisa_checkpoint(release["dir"], release["clip_dir"], other)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------- tokenizer folder faults
def _copy(release, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(release["dir"], folder)
    return folder


def test_missing_sentencepiece_is_one_line_naming_the_extra(release, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(UnsupportedError, match=r"sentencepiece.*llavaseg\[lisa\]") as info:
        load_lisa_checkpoint(release["dir"], release["clip_dir"], release["sam"])
    assert "\n" not in str(info.value)


def test_protobuf_is_not_needed(release, monkeypatch):
    monkeypatch.setitem(sys.modules, "google.protobuf", None)
    from llavaseg.seg_token.lisa_tokenizer import lisa_tokenizer

    _tokenizer, seg_id, image_id = lisa_tokenizer(release["dir"], 703, True)
    assert (seg_id, image_id) == (700, 703)


@pytest.mark.parametrize(("fault", "error", "match"), [
    ("no tokenizer.model", CheckpointMismatchError, "no tokenizer.model"),
    ("legacy false", UnsupportedError, "legacy=False"),
    ("id gap", CheckpointMismatchError, "added_tokens.json"),
    ("no [SEG]", CheckpointMismatchError, r"has no \[SEG\]"),
])
def test_bad_tokenizer_files_are_one_line(release, tmp_path, fault, error, match):
    folder = _copy(release, tmp_path)
    if fault == "no tokenizer.model":
        (folder / "tokenizer.model").unlink()
    elif fault == "legacy false":
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": False}))
    elif fault == "id gap":
        (folder / "added_tokens.json").write_text(json.dumps({"[SEG]": 700, "<im_start>": 702, "<im_end>": 703}))
    else:
        (folder / "added_tokens.json").write_text(json.dumps({"<im_start>": 700, "<im_end>": 701}))
    with pytest.raises(error, match=match) as info:
        load_lisa_checkpoint(folder, release["clip_dir"], release["sam"])
    assert "\n" not in str(info.value)
