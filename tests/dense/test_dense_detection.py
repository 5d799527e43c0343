"""torchvision Mask R-CNN and RetinaNet on BiFormer + FPN: shapes at odd sizes, training, bad arguments."""

from __future__ import annotations

import pytest
import torch
from dense_helpers import TINY, generated_crops
from torchvision.models.detection import MaskRCNN, RetinaNet

from biformer.dense import BiFormerBackbone, BiFormerFPN, SceneDataset, maskrcnn_biformer, retinanet_biformer
from biformer.dense.detection import maskrcnn_biformer_tiny

SMALL = dict(backbone_options=dict(n_win=2, batch_norm="train"), fpn_channels=32, min_size=48, max_size=64,
             anchor_sizes=(8, 16, 32, 64, 128))
MASKRCNN_SMALL = dict(SMALL, representation_size=64, mask_head_channels=16, rpn_pre_nms_top_n_train=200,
                      rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
                      box_batch_size_per_image=64)
BUILDERS = {"maskrcnn": lambda: maskrcnn_biformer(TINY, 4, **MASKRCNN_SMALL),
            "retinanet": lambda: retinanet_biformer(TINY, 4, **SMALL)}


def scene_batch(count: int = 2, size: int = 48) -> tuple[list, list]:
    crops, labels = generated_crops()
    dataset = SceneDataset(crops, labels, count, image_size=size, objects=(1, 2))
    images, targets = zip(*(dataset[i] for i in range(count)))
    return list(images), list(targets)


def test_fpn_levels_at_odd_size():
    fpn = BiFormerFPN(BiFormerBackbone(TINY, n_win=2), out_channels=16).eval()
    with torch.no_grad():
        levels = fpn(torch.rand(1, 3, 67, 91))
    assert list(levels) == ["0", "1", "2", "3"]
    assert [tuple(v.shape) for v in levels.values()] == [(1, 16, 17, 23), (1, 16, 9, 12), (1, 16, 5, 6), (1, 16, 3, 3)]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_train_and_eval_at_odd_sizes(name):
    model = BUILDERS[name]()
    images, targets = scene_batch()
    images = [torch.nn.functional.pad(images[0], (0, 5, 0, 0)), torch.nn.functional.pad(images[1], (0, 0, 0, 7))]
    targets = [dict(t, masks=torch.nn.functional.pad(t["masks"], (0, i.shape[2] - 48, 0, i.shape[1] - 48)))
               for t, i in zip(targets, images)]  # two different odd sizes: 48 x 53 and 55 x 48
    losses = model.train()(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert model.backbone.body.stages[0][0].attn.qkv.qkv.weight.grad.abs().sum() > 0
    with torch.no_grad():
        outputs = model.eval()(images)
    for output, image in zip(outputs, images):
        assert output["boxes"].shape[1] == 4 and len(output["labels"]) == len(output["scores"])
        if name == "maskrcnn":
            assert output["masks"].shape[1:] == (1, *image.shape[1:])


@pytest.mark.parametrize("name", list(BUILDERS))
def test_loss_falls_when_overfitting_one_batch(name):
    torch.manual_seed(0)
    model = BUILDERS[name]().train()
    images, targets = scene_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(15):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0], losses


def test_named_builders_give_torchvision_models():
    model = maskrcnn_biformer_tiny(num_classes=5, min_size=64, max_size=64)
    assert isinstance(model, MaskRCNN) and model.roi_heads.box_predictor.cls_score.out_features == 5
    assert model.backbone.body.batch_norm == "eval" and model.backbone.body.bra_layers()[0].n_win == 16
    assert isinstance(retinanet_biformer(TINY, 3, **SMALL), RetinaNet)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [(dict(num_classes=1), "num_classes"), (dict(anchor_sizes=(8, 16)), "anchor_sizes"),
     (dict(fpn_channels=0), "fpn_channels"), (dict(representation_size=0), "representation_size"),
     (dict(min_size=0), "min_size"), (dict(min_size=64, max_size=32), "max_size")],
)
def test_bad_arguments(kwargs, message):
    kwargs = {"num_classes": 3, **SMALL, **kwargs}
    with pytest.raises(ValueError, match=message):
        maskrcnn_biformer(TINY, **kwargs)
