"""Pieces of dense training: n_win="auto", UperNet's auxiliary head and its loss, gathering detections across
processes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from biformer.dense import BiFormerBackbone
from biformer.dense.segmentation import AuxiliaryFCNHead, upernet_biformer
from biformer.dense.tasks import DetectionTask, SegmentationTask
from biformer.models.backbone import REFERENCE_N_WIN, auto_n_win
from dense.dense_helpers import TINY


def test_auto_n_win_follows_the_reference_settings():
    assert [auto_n_win(side, side) for side, _ in REFERENCE_N_WIN] == [7, 8, 16]
    assert auto_n_win(800, 1333) == auto_n_win(1333, 800) == 16  # COCO: the shorter side counts
    assert auto_n_win(512, 2048) == 8
    # below 224 px: regions of 8 x 8 stage-1 tokens (side / 32); proportional above 800
    assert [auto_n_win(s, s) for s in (16, 32, 64, 128, 160)] == [1, 1, 2, 4, 5]
    assert auto_n_win(1600, 1600) == 32
    # linear in between: 368 px is halfway from 224 (7) to 512 (8); 656 halfway from 512 (8) to 800 (16)
    assert auto_n_win(368, 368) == 8 and auto_n_win(656, 656) == 12
    sides = range(1, 2000, 7)
    values = [auto_n_win(s, s) for s in sides]
    assert values == sorted(values)  # never decreases with the size


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "7"])
def test_auto_n_win_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="height: expected a positive integer"):
        auto_n_win(bad, 100)


def test_backbone_with_auto_n_win_picks_it_per_input():
    backbone = BiFormerBackbone(TINY, n_win="auto").eval()
    assert backbone.n_win == "auto" and backbone.smallest_n_win() == 2  # topk 4 needs 2 x 2 regions
    layers = backbone.bra_layers()
    for size, expected in ((64, 2), (128, 4), (32, 2)):  # 32 px: 1 by the rule, 2 for topk 4
        maps = backbone(torch.rand(1, 3, size, size))
        assert {layer.n_win for layer in layers} == {expected}
        assert maps[0].shape[-1] == size // 4
    backbone.set_n_win(3)
    backbone(torch.rand(1, 3, 128, 128))
    assert {layer.n_win for layer in layers} == {3}  # a fixed value stays fixed
    # the same weights and n_win give the same maps whichever way n_win was chosen
    fixed = BiFormerBackbone(TINY, n_win=4).eval()
    fixed.load_state_dict(backbone.state_dict())
    backbone.set_n_win("auto")
    images = torch.rand(1, 3, 128, 128)
    for got, expected in zip(backbone(images), fixed(images)):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("bad", [0, "many", 2.0, None, True])
def test_bad_n_win_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="n_win: expected an integer >= 1 or 'auto'"):
        BiFormerBackbone(TINY, n_win=bad)
    with pytest.raises(ValueError, match="n_win: expected an integer >= 1 or 'auto'"):
        BiFormerBackbone(TINY, n_win=4).set_n_win(bad)


def test_upernet_auxiliary_head_trains_only():
    torch.manual_seed(0)
    model = upernet_biformer(TINY, 5, backbone_options=dict(n_win=2), head_options=dict(channels=16),
                             auxiliary_head=dict(channels=8))
    assert isinstance(model.auxiliary_head, AuxiliaryFCNHead) and model.auxiliary_head.in_index == 2
    images = torch.rand(2, 3, 64, 64)
    logits, auxiliary = model.train()(images)
    assert logits.shape == auxiliary.shape == (2, 5, 64, 64)
    model.eval()
    assert torch.is_tensor(model(images)) and model(images).shape == (2, 5, 64, 64)
    plain = upernet_biformer(TINY, 5, backbone_options=dict(n_win=2), head_options=dict(channels=16))
    assert plain.auxiliary_head is None and torch.is_tensor(plain.train()(images))
    with pytest.raises(ValueError, match="auxiliary_head: in_index must be a stage index"):
        upernet_biformer(TINY, 5, auxiliary_head=dict(in_index=4))
    with pytest.raises(ValueError, match="auxiliary_head: expected True, False or a dict"):
        upernet_biformer(TINY, 5, auxiliary_head="yes")


def test_segmentation_loss_adds_the_auxiliary_loss_with_weight_0_4():
    torch.manual_seed(0)
    task = SegmentationTask(None, None, 5, architecture="upernet", variant=TINY,
                            model_options=dict(backbone_options=dict(n_win=2), head_options=dict(channels=16),
                                               auxiliary_head=dict(channels=8, dropout=0.0)))
    model = task.build_model()
    model.head.dropout.p = 0.0
    images, masks = torch.rand(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    masks[0, :4] = 255  # ignored pixels
    loss, parts = task.loss(model, (images, masks))
    model.train()
    logits, auxiliary = model(images)
    expected = (F.cross_entropy(logits.double(), masks, ignore_index=255)
                + 0.4 * F.cross_entropy(auxiliary.double(), masks, ignore_index=255))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(parts) == {"cross_entropy", "auxiliary_cross_entropy"}


class _FixedDetector(torch.nn.Module):
    """Returns stored detections for images identified by their first pixel value."""

    def __init__(self, outputs: dict[int, dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.outputs = outputs

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [self.outputs[int(image[0, 0, 0].item())] for image in images]


def test_detection_metrics_gathered_from_two_shards_equal_one_pass():
    generator = torch.Generator().manual_seed(0)
    images, targets, outputs = [], [], {}
    for index in range(6):
        boxes = torch.rand(3, 2, generator=generator) * 40
        boxes = torch.cat([boxes, boxes + 10 + torch.rand(3, 2, generator=generator) * 20], dim=1)  # (3, 4) xyxy
        labels = torch.randint(1, 4, (3,), generator=generator)
        targets.append({"boxes": boxes, "labels": labels})
        images.append(torch.full((3, 8, 8), float(index)))
        noisy = boxes + torch.randn(3, 4, generator=generator) * 3
        outputs[index] = {"boxes": noisy, "labels": labels, "scores": torch.rand(3, generator=generator)}
    model = _FixedDetector(outputs)
    task = DetectionTask(None, None, 4, architecture="retinanet")

    whole = task.new_metrics()
    whole.update(model, (images, targets))
    whole.gather(lambda value: [value])
    expected = whole.compute()

    shards = [task.new_metrics(), task.new_metrics()]
    for rank, shard in enumerate(shards):  # images rank, rank + 2, ... as the engine's ShardSampler
        shard.update(model, (images[rank::2], targets[rank::2]))
    # what all_gather_object gives process 0, in the order gather asks: each list state, then the image count
    answers = iter([[list(shard.metric.metric_state[name]) for shard in shards] for name in whole.metric.metric_state]
                   + [[shard.images for shard in shards]])

    def gather_objects(value: object) -> list:
        answer = next(answers)
        assert value == answer[0] if isinstance(value, int) else len(value) == len(answer[0])  # process 0's own
        return answer

    shards[0].gather(gather_objects)
    gathered = shards[0].compute()
    assert gathered["images"] == 6 and 0 < expected["mAP@0.5"] < 1
    for key in ("mAP", "mAP@0.5", "mAP@0.75"):
        assert gathered[key] == pytest.approx(expected[key], abs=1e-9), key
