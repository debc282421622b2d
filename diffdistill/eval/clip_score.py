"""CLIP score (Hessel et al. 2021, eq. 1 with w = 100, as torchmetrics and most distillation papers use it)::

    CLIPScore(image, prompt) = 100 · max(cos(E_image(image), E_text(prompt)), 0)

averaged over image–prompt pairs, through open_clip. Images go through the model's own evaluation
preprocessing (open_clip's ``image_transform``: bicubic resize of the short side, centre crop,
normalisation) after 8-bit rounding, exactly as a saved PNG would be scored.

Pretrained weights are not bundled: :meth:`ClipScorer.from_pretrained` loads an open_clip tag (from the
Hugging Face cache, or downloaded when online) or a local weights file, and says in one line what to
supply when neither is there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from ..errors import DataError, ModelLoadError
from ..grid import to_uint8

DEFAULT_CLIP_MODEL = "ViT-B-32"
DEFAULT_CLIP_PRETRAINED = "laion2b_s34b_b79k"


class ClipScorer:
    """An open_clip model, its tokenizer and its evaluation preprocessing."""

    def __init__(self, model: torch.nn.Module, tokenizer, preprocess, *, name: str,
                 device: str | torch.device = "cpu") -> None:
        self.model = model.eval().requires_grad_(False).to(device)
        self.tokenizer, self.preprocess, self.name, self.device = tokenizer, preprocess, name, torch.device(device)

    @classmethod
    def from_pretrained(cls, model_name: str = DEFAULT_CLIP_MODEL, pretrained: str = DEFAULT_CLIP_PRETRAINED,
                        device: str | torch.device = "cpu") -> "ClipScorer":
        """open_clip's ``model_name`` with ``pretrained`` weights: a tag (e.g. ``laion2b_s34b_b79k``) or a
        local file (``.safetensors`` preferred; other files load with ``weights_only=True``). A
        ``local-dir:PATH`` model name reads ``open_clip_config.json`` and the weights from that folder
        (``pretrained`` is then ignored)."""
        import open_clip

        if model_name.startswith("local-dir:"):
            pretrained = None
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained,
                                                                         device=device, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - offline hub errors come in many types; all mean the same here
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
            where = ("the folder" if pretrained is None else "the file" if Path(pretrained).suffix
                     else "the Hugging Face cache (HF_HOME)")
            raise ModelLoadError(f"cannot load CLIP {model_name} weights '{pretrained or ''}' from {where} ({reason}); "
                                 "download them on a machine with internet and pass --clip-pretrained "
                                 "PATH/open_clip_model.safetensors") from exc
        return cls(model, open_clip.get_tokenizer(model_name), preprocess,
                   name=f"open_clip:{model_name}" + (f":{Path(pretrained).name}" if pretrained else ""), device=device)

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings of ``(N, C, H, W)`` images in ``[-1, 1]`` (grey repeated to RGB)."""
        arr = to_uint8(images)
        pil = [Image.fromarray(a[:, :, 0], "L").convert("RGB") if a.shape[-1] == 1 else Image.fromarray(a, "RGB")
               for a in arr]
        pixels = torch.stack([self.preprocess(p) for p in pil]).to(self.device)
        return torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings of ``prompts``."""
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def scores(self, images: torch.Tensor, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Per-pair CLIP scores ``100 · max(cos, 0)``; ``prompts[i]`` belongs to ``images[i]``."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        out = []
        for start in range(0, len(images), batch_size):
            img = self.image_embeddings(images[start:start + batch_size])
            txt = self.text_embeddings(prompts[start:start + batch_size])
            out.append(100 * (img * txt).sum(dim=-1).clamp(min=0))
        return torch.cat(out).cpu()

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], batch_size: int = 64) -> float:
        """Mean CLIP score over the pairs."""
        return float(self.scores(images, prompts, batch_size).double().mean())


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-empty line of a text file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompt file {path} does not exist; give a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise DataError(f"prompt file {path} holds no prompts; write one prompt per line")
    return prompts
