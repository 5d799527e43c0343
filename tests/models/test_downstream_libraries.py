"""Libraries built on timm: Hugging Face transformers reads our Hub folders (offline), and
segmentation_models_pytorch builds its timm-universal encoders (``tu-biformer_*``) on our models."""

from __future__ import annotations

import huggingface_hub.constants
import numpy as np
import pytest
import timm
import torch
from PIL import Image

from biformer.hub import save_pretrained

transformers = pytest.importorskip("transformers")
smp = pytest.importorskip("segmentation_models_pytorch")

LABELS = ["cat", "dog", "bird"]


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A saved biformer_nano with three named classes and non-default weights, loaded with the Hub offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    torch.manual_seed(0)
    model = timm.create_model("biformer_nano", num_classes=3, n_win=2, topks=[2, 2, 4, -2]).eval()
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if key.endswith("running_mean"):
                tensor.normal_(0, 0.1)
    return model, save_pretrained(model, tmp_path / "nano", label_names=LABELS)


def test_transformers_loads_a_saved_folder(folder):
    """AutoModelForImageClassification and TimmWrapperForImageClassification give our logits exactly, with the
    label names as id2label; AutoImageProcessor gives timm's own eval preprocessing."""
    model, path = folder
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        expected = model(x)
    for loader in (transformers.AutoModelForImageClassification, transformers.TimmWrapperForImageClassification):
        wrapped = loader.from_pretrained(str(path)).eval()
        assert isinstance(wrapped, transformers.TimmWrapperForImageClassification)
        assert wrapped.config.id2label == dict(enumerate(LABELS))
        with torch.no_grad():
            torch.testing.assert_close(wrapped(pixel_values=x).logits, expected, atol=0, rtol=0)

    processor = transformers.AutoImageProcessor.from_pretrained(str(path))
    image = Image.fromarray((np.random.default_rng(0).random((90, 120, 3)) * 255).astype(np.uint8))
    pixels = processor(image, return_tensors="pt")["pixel_values"]
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    torch.testing.assert_close(pixels, transform(image).unsqueeze(0))


@pytest.mark.parametrize("decoder", ["Unet", "FPN", "UPerNet"])
def test_segmentation_models_pytorch_encoders(decoder):
    """smp's timm-universal encoder on biformer_tiny: a segmentation map at the input size, gradients, and the
    encoder's features are the model's own stage maps."""
    torch.manual_seed(0)
    network = getattr(smp, decoder)("tu-biformer_tiny", encoder_weights=None, classes=2)
    x = torch.randn(2, 3, 64, 64)
    out = network(x)
    assert out.shape == (2, 2, 64, 64)
    out.mean().backward()
    assert all(p.grad is not None for p in network.encoder.parameters())

    network.eval()
    plain = timm.create_model("biformer_tiny", num_classes=0).eval()
    weights = {k.removeprefix("model."): v for k, v in network.encoder.model.state_dict().items()}
    result = plain.load_state_dict(weights, strict=False)  # the encoder has no final norm
    assert not result.unexpected_keys and {k.split(".")[0] for k in result.missing_keys} == {"norm"}
    with torch.no_grad():
        stage_maps = plain.forward_intermediates(x, intermediates_only=True)
        encoder_maps = [f for f in network.encoder(x) if f.shape[1] > 0][1:]  # drop the input and empty levels
    assert len(encoder_maps) == 4
    for got, expected in zip(encoder_maps, stage_maps):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
