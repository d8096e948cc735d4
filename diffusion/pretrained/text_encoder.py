"""The CLIP text encoder of U-ViT's MS-COCO models (transformers ``CLIPTokenizer`` + ``CLIPTextModel``).

A caption becomes the 77 x 768 last hidden state of CLIP ViT-L/14's text transformer, padded to 77 tokens with
``<|endoftext|>``, as in U-ViT and Stable Diffusion. Only ``input_ids`` go into the model (no attention mask), as
there: the causal mask alone decides what the padding positions see, and the network reads all 77 positions. The
encoding of the empty caption "" is the null context for classifier-free guidance.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from diffusion.errors import ConfigError, WeightsNotFoundError
from diffusion.pretrained.autoencoder import looks_like_hub_id, resolve_dtype

CLIP_HUB_ID = "openai/clip-vit-large-patch14"
HOW_TO_GET_CLIP = (
    "Provide the CLIP text encoder and point --config.text_encoder.pretrained at it:\n"
    "  * a local folder: `huggingface-cli download openai/clip-vit-large-patch14 "
    "--local-dir assets/clip-vit-large-patch14`, then --config.text_encoder.pretrained=assets/clip-vit-large-patch14\n"
    "  * a hub id (needs network, or the files already in the Hugging Face cache)."
)


def _load_clip(pretrained: str, dtype: torch.dtype):
    from transformers import CLIPTextModel, CLIPTokenizer

    path = Path(pretrained).expanduser()
    if not path.is_dir() and not looks_like_hub_id(pretrained):
        raise WeightsNotFoundError(f"CLIP text encoder not found: no folder {pretrained!r} (and it is not a Hugging "
                                   f"Face Hub id).\n{HOW_TO_GET_CLIP}")
    source = str(path) if path.is_dir() else pretrained
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source)
        model = CLIPTextModel.from_pretrained(source, dtype=dtype)
    except OSError as error:  # transformers/huggingface_hub report missing files and no network as OSError
        first = (str(error).strip().splitlines() or [""])[0]
        raise WeightsNotFoundError(f"could not load the CLIP text encoder from {pretrained!r} "
                                   f"({type(error).__name__}: {first}).\n{HOW_TO_GET_CLIP}") from None
    return tokenizer, model


class TextEncoder:
    """Frozen CLIP text transformer: prompts -> (B, max_length, hidden) float32 contexts, batched, no grad."""

    def __init__(self, tokenizer, model, *, device="cpu", max_length: int = 77):
        positions = model.config.max_position_embeddings
        if max_length > positions:
            raise ConfigError(f"max_length {max_length} exceeds the text model's {positions} positions")
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.max_length = int(max_length)
        self.hidden_size = int(model.config.hidden_size)

    @classmethod
    def load(cls, pretrained: str = CLIP_HUB_ID, *, device="cpu", dtype: str | torch.dtype = "fp32",
             max_length: int = 77) -> TextEncoder:
        if not pretrained:
            raise ConfigError("no text encoder given (text_encoder.pretrained is empty).\n" + HOW_TO_GET_CLIP)
        tokenizer, model = _load_clip(pretrained, resolve_dtype(dtype))
        return cls(tokenizer, model, device=device, max_length=max_length)

    @classmethod
    def from_config(cls, config, device="cpu") -> TextEncoder:
        """``config`` is the ``text_encoder`` section: pretrained, max_length (and optionally dtype)."""
        return cls.load(config.pretrained, device=device, dtype=config.get("dtype", "fp32"),
                        max_length=config.get("max_length", 77))

    def tokenize(self, prompts: list[str]) -> Tensor:
        """-> (B, max_length) token ids: ``<|startoftext|>`` prompt ``<|endoftext|>``, padded and truncated."""
        return self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                              return_tensors="pt").input_ids

    @torch.no_grad()
    def encode(self, prompts: list[str], batch_size: int = 64) -> Tensor:
        """(B,) prompts -> (B, max_length, hidden) float32 last hidden states on the encoder's device."""
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts, not a single string")
        outs = []
        for start in range(0, len(prompts), batch_size):
            ids = self.tokenize(prompts[start:start + batch_size]).to(self.device)
            outs.append(self.model(input_ids=ids).last_hidden_state.float())
        return torch.cat(outs)

    def null_context(self) -> Tensor:
        """(max_length, hidden): the encoding of "" that stands for "no caption" in classifier-free guidance."""
        return self.encode([""])[0]
