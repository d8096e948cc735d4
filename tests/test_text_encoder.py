"""The CLIP text encoder wrapper, loaded from a tiny real CLIPTextModel + byte-level BPE tokenizer folder."""

from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import CLIPTextModel

from diffusion.config.schema import base_config
from diffusion.errors import WeightsNotFoundError
from diffusion.pretrained.text_encoder import TextEncoder
from tests.helpers import BOS, EOS, make_tiny_clip

PROMPTS = ["a cat and a dog", "the dog", "A cat sitting on the mat, next to the dog!"]
LONG = " ".join(["the cat and the dog"] * 30)  # 150 words: far beyond 77 tokens


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def encoder(clip_dir) -> TextEncoder:
    return TextEncoder.load(str(clip_dir))


def test_round_trip_shapes_and_frozen_model(encoder):
    contexts = encoder.encode(PROMPTS)
    assert (encoder.hidden_size, encoder.max_length) == (32, 77)
    assert contexts.shape == (3, 77, 32) and contexts.dtype == torch.float32 and not contexts.requires_grad
    assert not encoder.model.training and not any(p.requires_grad for p in encoder.model.parameters())


def test_tokens_are_padded_to_max_length_with_end_of_text(encoder):
    ids = encoder.tokenize(["The cat and the dog!"])[0]
    tokens = encoder.tokenizer.convert_ids_to_tokens(ids)
    assert len(tokens) == 77
    assert tokens[:8] == [BOS, "the</w>", "cat</w>", "and</w>", "the</w>", "dog</w>", "!</w>", EOS]  # BPE merges
    assert set(tokens[8:]) == {EOS}


def test_long_prompts_are_truncated(encoder):
    tokens = encoder.tokenizer.convert_ids_to_tokens(encoder.tokenize([LONG])[0])
    assert len(tokens) == 77 and tokens[0] == BOS and tokens[-1] == EOS and EOS not in tokens[1:-1]
    # What lies past the 75th word piece cannot change the encoding.
    torch.testing.assert_close(encoder.encode([LONG + " and a mat"]), encoder.encode([LONG]), atol=0, rtol=0)


def test_encoding_is_clip_last_hidden_state_of_the_input_ids_alone(clip_dir, encoder):
    """As U-ViT and Stable Diffusion: no attention mask, so the padded positions carry what CLIP computes there."""
    reference = CLIPTextModel.from_pretrained(clip_dir).eval()
    with torch.no_grad():
        expected = reference(input_ids=encoder.tokenize(PROMPTS)).last_hidden_state
    torch.testing.assert_close(encoder.encode(PROMPTS), expected, atol=1e-6, rtol=0)


def test_same_prompt_same_encoding_different_prompts_differ(encoder):
    first, again = encoder.encode(PROMPTS), encoder.encode(PROMPTS)
    assert torch.equal(first, again)
    assert (first[0] - first[1]).abs().max() > 1e-3
    assert (first[1] - first[2]).abs().max() > 1e-3


def test_batching_does_not_change_results(encoder):
    prompts = PROMPTS + [LONG, ""]
    torch.testing.assert_close(encoder.encode(prompts, batch_size=2), encoder.encode(prompts), atol=1e-6, rtol=0)


def test_null_context_is_the_empty_caption(encoder):
    null = encoder.null_context()
    assert null.shape == (77, 32)
    assert torch.equal(null, encoder.encode([""])[0])
    torch.testing.assert_close(encoder.encode(["the dog", ""])[1], null, atol=1e-6, rtol=0)
    assert (null - encoder.encode(["the dog"])[0]).abs().max() > 1e-3


def test_max_length_and_dtype_options(clip_dir):
    short = TextEncoder.load(str(clip_dir), max_length=16, dtype="bf16")
    assert next(short.model.parameters()).dtype == torch.bfloat16
    contexts = short.encode(PROMPTS)
    assert contexts.shape == (3, 16, 32) and contexts.dtype == torch.float32
    with pytest.raises(ValueError, match="exceeds the text model's 77 positions"):
        TextEncoder.load(str(clip_dir), max_length=78)
    with pytest.raises(TypeError, match="list of prompts"):
        short.encode("a single string")


def test_from_config_section(clip_dir):
    config = base_config().text_encoder
    config.update(pretrained=str(clip_dir), max_length=32)
    encoder = TextEncoder.from_config(config)
    assert encoder.encode(["the cat"]).shape == (1, 32, 32)


# ----------------------------------------------------------------------------------------------------------------
# Missing weights: one clear error naming what was looked for and the fix
# ----------------------------------------------------------------------------------------------------------------
def _assert_clear(info, needle):
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for part in (needle, "--config.text_encoder.pretrained", "huggingface-cli download openai/clip-vit-large-patch14"):
        assert part in message
    assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)
    assert Path(info.traceback[-1].path).name == "text_encoder.py"


@pytest.mark.parametrize("missing", ["/nonexistent/assets/clip-vit-large-patch14", "./clip-vit-large-patch14"])
def test_missing_folder(missing):
    with pytest.raises(WeightsNotFoundError) as info:
        TextEncoder.load(missing)
    _assert_clear(info, missing)


def test_folder_without_model_files(tmp_path):
    with pytest.raises(WeightsNotFoundError) as info:
        TextEncoder.load(str(tmp_path))
    _assert_clear(info, str(tmp_path))


def test_unreachable_hub_id(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once instead of retrying
    with pytest.raises(WeightsNotFoundError) as info:
        TextEncoder.load("nobody-here/no-such-clip")
    _assert_clear(info, "nobody-here/no-such-clip")


def test_empty_pretrained_is_refused():
    with pytest.raises(ValueError, match="text_encoder.pretrained is empty"):
        TextEncoder.from_config(base_config().text_encoder)
