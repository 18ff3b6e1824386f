"""Templates: validated at load time with errors naming the file, user folders override, shipped in the wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from llavaseg.errors import TemplateError
from llavaseg.prompting import PromptSet, default_prompts_dir


def test_default_templates_render_their_placeholders():
    prompts = PromptSet.load()
    reason = prompts.render("reason", query="the thing a child uses to stay dry")
    assert "the thing a child uses to stay dry" in reason
    assert not any(line.startswith("#") for line in reason.splitlines())  # comments are not sent
    assert "umbrella" in prompts.render("attributes", description="umbrella", query="q")


def test_unknown_placeholder_names_file_and_field(tmp_path: Path):
    (tmp_path / "attributes.txt").write_text("Describe the {colour} of the {description}.")
    with pytest.raises(TemplateError) as info:
        PromptSet.load(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "attributes.txt") in message and "{colour}" in message
    assert "\n" not in message


def test_missing_required_placeholder(tmp_path: Path):
    (tmp_path / "reason.txt").write_text("Which object is it?")
    with pytest.raises(TemplateError, match=r"reason\.txt: missing required placeholder\(s\) \{query\}"):
        PromptSet.load(tmp_path)


@pytest.mark.parametrize("body", ["{query", "{query} }", "{0} {query}", "{query.upper}"])
def test_malformed_templates_are_refused(tmp_path: Path, body: str):
    (tmp_path / "reason.txt").write_text(body)
    with pytest.raises(TemplateError, match="reason.txt"):
        PromptSet.load(tmp_path)


def test_literal_braces_are_allowed(tmp_path: Path):
    (tmp_path / "attributes.txt").write_text('Answer as JSON like {{"color": "..."}} for the {description}.')
    prompts = PromptSet.load(tmp_path)
    assert prompts.render("attributes", description="cup") == 'Answer as JSON like {"color": "..."} for the cup.'


def test_missing_folder_is_a_clear_error(tmp_path: Path):
    with pytest.raises(TemplateError, match="does not exist"):
        PromptSet.load(tmp_path / "nope")


def test_edited_user_template_changes_the_prompt_the_mllm_receives(tmp_path: Path, rgb_image, tiny_segmenter):
    """The prompt text reaching the MLLM's processor changes when the user edits a template."""
    from llavaseg import Segmenter

    (tmp_path / "reason.txt").write_text("Find this: {query} -- name it in one word.")
    custom = Segmenter(tiny_segmenter.mllm, tiny_segmenter.sam, tiny_segmenter.text_encoder,
                       tiny_segmenter.adapters, prompts_dir=tmp_path, with_answer=False)
    seen: list[str] = []
    processor = custom.mllm.processor
    original = type(processor).__call__

    def recording_call(self, *args, **kwargs):  # test double: records what the real processor receives
        seen.extend(kwargs.get("text") or [])
        return original(self, *args, **kwargs)

    type(processor).__call__ = recording_call
    try:
        result = custom(rgb_image, "the red thing")
        default_result = tiny_segmenter.with_route("llavaseg")(rgb_image, "the red thing")
    finally:
        type(processor).__call__ = original
    assert any("Find this: the red thing -- name it in one word." in text for text in seen)
    assert result.prompts["reason"] == "Find this: the red thing -- name it in one word."
    assert default_result.prompts["reason"] != result.prompts["reason"]
    # the attributes stage still uses the shipped default (the user folder only overrides reason.txt)
    assert result.prompts["attributes"].startswith("Describe the visual attributes")


def test_templates_ship_inside_the_wheel(tmp_path: Path):
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(root)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("llavaseg-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for stage in ("reason", "attributes"):
        assert f"llavaseg/default_prompts/{stage}.txt" in names
    assert default_prompts_dir().joinpath("reason.txt").is_file()
