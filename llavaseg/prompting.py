"""Prompt templates for the chain-of-thought stages: loading, validation and rendering.

Templates are plain text files (one per stage) so researchers can change wording without touching code. They
use ``str.format`` placeholders; each stage declares which placeholders it provides and which it requires,
and a template is validated when it is loaded, so a typo fails at start-up with the file name, not halfway
through a benchmark.
"""

from __future__ import annotations

import string
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from llavaseg.errors import TemplateError


class StageSpec(BaseModel):
    """Which placeholders a stage's template must use and may use."""

    model_config = ConfigDict(frozen=True)

    required: frozenset[str]
    optional: frozenset[str] = frozenset()

    @property
    def allowed(self) -> frozenset[str]:
        return self.required | self.optional


STAGES: dict[str, StageSpec] = {
    "reason": StageSpec(required=frozenset({"query"})),
    "attributes": StageSpec(required=frozenset({"description"}), optional=frozenset({"query"})),
    # the llavaseg-verify route: a new one-turn chat on the image with one candidate highlighted
    "verify": StageSpec(required=frozenset({"query"}), optional=frozenset({"description"})),
}


def default_prompts_dir() -> Path:
    """The templates shipped with the package (the checkout's top-level ``prompts/`` folder)."""
    return Path(str(resources.files("llavaseg.default_prompts")))


def _strip_comments(text: str) -> str:
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return "\n".join(lines).strip()


def _placeholders(template: str, source: str) -> set[str]:
    """The placeholder names of a template. Only plain ``{name}`` fields are allowed: a format spec or
    conversion (``{query:>100000000}``, ``{query!r}``, ``{query:d}``) could build a huge prompt or fail only
    when the first query is rendered, so it is refused here, when the template is loaded."""
    try:
        parsed = [(field, spec, conversion) for _, field, spec, conversion in string.Formatter().parse(template)
                  if field is not None]
    except ValueError as exc:  # e.g. "Single '}' encountered in format string"
        raise TemplateError(f"{source}: malformed template ({exc}); write literal braces as '{{{{' and '}}}}'") from None
    bad = sorted({field for field, _, _ in parsed if not field.isidentifier()})
    if bad:
        raise TemplateError(f"{source}: placeholder(s) {bad} are not plain names like {{query}}")
    decorated = sorted({field for field, spec, conversion in parsed if spec or conversion})
    if decorated:
        raise TemplateError(f"{source}: placeholder(s) {', '.join('{' + f + '}' for f in decorated)} carry a format "
                            "spec or conversion (':...' or '!r'); write plain {name} fields")
    return {field for field, _, _ in parsed}


class PromptTemplate(BaseModel):
    """One validated stage template and the file it came from."""

    model_config = ConfigDict(frozen=True)

    stage: str
    text: str
    source: str

    def render(self, **values: str) -> str:
        spec = STAGES[self.stage]
        missing = spec.required - values.keys()
        if missing:
            raise TemplateError(f"{self.source}: no value given for {sorted(missing)}")
        return self.text.format(**{key: values.get(key, "") for key in spec.allowed})


def validate_template(stage: str, text: str, source: str) -> PromptTemplate:
    """Check a template's placeholders against its stage and return it; raise ``TemplateError`` otherwise."""
    if stage not in STAGES:
        raise TemplateError(f"{source}: unknown stage {stage!r}; stages are {sorted(STAGES)}")
    spec = STAGES[stage]
    body = _strip_comments(text)
    if not body:
        raise TemplateError(f"{source}: template is empty")
    fields = _placeholders(body, source)
    unknown = fields - spec.allowed
    if unknown:
        allowed = ", ".join("{" + name + "}" for name in sorted(spec.allowed))
        raise TemplateError(
            f"{source}: unknown placeholder(s) {', '.join('{' + u + '}' for u in sorted(unknown))}; "
            f"the {stage!r} stage provides {allowed}"
        )
    missing = spec.required - fields
    if missing:
        raise TemplateError(
            f"{source}: missing required placeholder(s) {', '.join('{' + m + '}' for m in sorted(missing))}"
        )
    return PromptTemplate(stage=stage, text=body, source=source)


class PromptSet(BaseModel):
    """The validated templates of all stages, loaded from one folder (defaults fill in missing files)."""

    model_config = ConfigDict(frozen=True)

    templates: dict[str, PromptTemplate]

    @classmethod
    def load(cls, directory: str | Path | None = None) -> PromptSet:
        default_dir = default_prompts_dir()
        directory = Path(directory) if directory is not None else default_dir
        if not directory.is_dir():
            raise TemplateError(f"prompt folder {directory} does not exist or is not a folder")
        templates = {}
        for stage in STAGES:
            path = directory / f"{stage}.txt"
            if not path.is_file():
                path = default_dir / f"{stage}.txt"
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise TemplateError(f"{path}: cannot read template ({exc})") from None
            templates[stage] = validate_template(stage, text, str(path))
        return cls(templates=templates)

    def render(self, stage: str, **values: str) -> str:
        if stage not in self.templates:
            raise TemplateError(f"unknown stage {stage!r}; stages are {sorted(self.templates)}")
        return self.templates[stage].render(**values)

    def identity(self) -> dict[str, str]:
        """Template texts by stage: part of every cache key, so edited prompts never reuse stale outputs."""
        return {stage: template.text for stage, template in sorted(self.templates.items())}
