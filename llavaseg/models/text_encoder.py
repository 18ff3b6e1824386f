"""A frozen open_clip model used as the text encoder (and, for the training-free route, image scorer).

Loading follows open_clip's own factory: ``create_model(name, pretrained=...)`` where ``pretrained`` is an
open_clip tag or a local weights file, or ``local-dir:PATH`` holding ``open_clip_config.json`` plus weights.
The small configs in ``clip_configs/`` are registered with open_clip so ``tiny-clip`` builds like ``ViT-B-32``.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError

from llavaseg.atomic import atomic_write, atomic_write_text
from llavaseg.errors import CheckpointMismatchError, UnsupportedError
from llavaseg.models.common import freeze, weights_error

_CONFIG_DIR = Path(__file__).with_name("clip_configs")
open_clip.add_model_config(_CONFIG_DIR)


def _tag_wants_quick_gelu(model_name: str, pretrained: str | Path | None) -> bool:
    """Whether open_clip's pretrained config says the tag was trained with QuickGELU (OpenAI's CLIP weights are)
    while the model config does not use it: then the model must be built with it, or every output is off."""
    if pretrained is None or Path(str(pretrained)).suffix or str(model_name).startswith(("local-dir:", "hf-hub:")):
        return False
    tag_cfg = open_clip.get_pretrained_cfg(model_name, str(pretrained)) or {}
    model_cfg = open_clip.get_model_config(model_name) or {}
    return bool(tag_cfg.get("quick_gelu")) and not model_cfg.get("quick_gelu")


class FrozenTextEncoder:
    """Frozen open_clip model; ``encode_text`` gives one L2-normalised vector per string."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, name: str, preprocess=None,
                 quick_gelu: bool = False) -> None:
        self.model = freeze(model)
        self.tokenizer = tokenizer
        self.name = name
        self.preprocess = preprocess
        self.quick_gelu = quick_gelu
        self._cache: dict[str, torch.Tensor] = {}

    @classmethod
    def create(cls, model_name: str, pretrained: str | Path | None = None, *, device: str = "cpu",
               seed: int = 0) -> FrozenTextEncoder:
        """Build ``model_name`` (an open_clip name or ``local-dir:PATH``) with optional ``pretrained`` weights.

        ``pretrained`` may be an open_clip pretrained tag (needs the hub) or a local ``.safetensors``/``.bin``
        file. Without weights the model is randomly initialised from ``seed`` (for tests and timing).
        """
        if pretrained is not None and Path(str(pretrained)).suffix and not Path(str(pretrained)).is_file():
            raise CheckpointMismatchError(f"open_clip weights file not found: {pretrained}")
        if pretrained is None and not str(model_name).startswith("local-dir:"):
            torch.manual_seed(seed)
        quick_gelu = _tag_wants_quick_gelu(model_name, pretrained)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=str(pretrained) if pretrained is not None else None, device=device,
                force_quick_gelu=quick_gelu)
        except (pickle.UnpicklingError, SafetensorError, EOFError) as exc:  # damaged or refused weights file
            raise weights_error("open_clip weights", pretrained or model_name, exc) from None
        except RuntimeError as exc:  # a failed download, or a state-dict mismatch (weights of another model)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "download" in first.lower():
                raise UnsupportedError(f"cannot fetch open_clip weights {model_name}:{pretrained} (not cached, no "
                                       f"network?); pass {model_name}:FILE with a local weights file") from None
            raise CheckpointMismatchError(f"open_clip weights {pretrained} do not fit {model_name}: {first}") from None
        except (FileNotFoundError, ValueError) as exc:
            raise UnsupportedError(f"cannot build open_clip model {model_name!r}: {exc}") from None
        tokenizer = open_clip.get_tokenizer(model_name)
        return cls(model, tokenizer, name=str(model_name) + (f"@{Path(str(pretrained)).name}" if pretrained else ""),
                   preprocess=preprocess, quick_gelu=quick_gelu)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        """Width of the joint embedding (what adapters receive)."""
        projection = getattr(self.model, "text_projection", None)
        if isinstance(projection, torch.Tensor):
            return int(projection.shape[1])
        if isinstance(projection, torch.nn.Linear):
            return int(projection.out_features)
        return int(self.model.encode_text(self.tokenizer(["x"]).to(self.device)).shape[-1])

    def identity(self) -> dict[str, str]:
        """Name plus a fingerprint of the weights (computed once: the model is frozen); adapters and caches
        record it."""
        if getattr(self, "_identity", None) is None:
            self._identity = self._compute_identity()
        return dict(self._identity)

    def _compute_identity(self) -> dict[str, str]:
        digest = hashlib.blake2b(digest_size=8)
        for key, tensor in sorted(self.model.state_dict().items()):
            if "text" in key or "token_embedding" in key or "positional" in key:
                digest.update(key.encode())
                digest.update(tensor.detach().flatten()[:512].float().cpu().numpy().tobytes())  # first 2048 bytes
        name = self.name.split("@")[0]
        if name.startswith("local-dir:"):  # where a model directory lives must not change who it is
            name = "local-dir:" + Path(name[len("local-dir:"):]).name
        identity = {"name": name, "weights": digest.hexdigest()}
        if self.quick_gelu:  # same weights, other activation: other outputs
            identity["activation"] = "quick_gelu"
        return identity

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """``len(texts) x dim`` normalised embeddings; repeated strings are served from a small memo."""
        missing = [text for text in dict.fromkeys(texts) if text not in self._cache]
        if missing:
            tokens = self.tokenizer(missing).to(self.device)
            features = F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu()
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache.update(zip(missing, features))
        if not texts:
            return torch.zeros((0, self.dim))
        return torch.stack([self._cache[text] for text in texts])

    @torch.inference_mode()
    def encode_images(self, images: list[np.ndarray]) -> torch.Tensor:
        """Normalised image embeddings (used by the training-free route to score mask crops)."""
        if self.preprocess is None:
            raise UnsupportedError(f"open_clip model {self.name} has no image preprocessing")
        batch = torch.stack([self.preprocess(Image.fromarray(image)) for image in images]).to(self.device)
        return F.normalize(self.model.encode_image(batch).float(), dim=-1).cpu()


def save_local_dir(encoder: FrozenTextEncoder, model_name: str, directory: Path) -> Path:
    """Write ``open_clip_config.json`` + ``open_clip_model.safetensors`` so ``local-dir:`` loading works."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": open_clip.get_model_config(model_name), "preprocess_cfg": {}}
    atomic_write_text(directory / "open_clip_config.json", json.dumps(config, indent=2))
    state = {k: v.detach().contiguous() for k, v in encoder.model.state_dict().items()}
    atomic_write(directory / "open_clip_model.safetensors", lambda tmp: save_file(state, tmp))
    return directory
