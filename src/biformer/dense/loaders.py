"""Loaders for your own data: COCO-format detection (images + instances JSON) and image/mask folders for
segmentation, in the same item format as :class:`~biformer.dense.SceneDataset`; and their collate functions.

An unreadable image or mask raises :class:`~biformer.images.ImageError` naming the file; wrap a dataset in
:class:`biformer.train.data.SkipUnreadable` to skip and count such items instead (the training engine does
this for every task, as its ``bad_images`` option says). ``source(index)`` names an item's files."""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import CocoDetection
from torchvision.transforms.v2 import functional as TF
from torchvision.tv_tensors import BoundingBoxFormat

from ..images import DEFAULT_MAX_PIXELS, ImageError, open_image

__all__ = ["CocoDetectionDataset", "MaskFolderDataset", "detection_collate", "segmentation_collate"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_MODES = ("L", "P", "I", "I;16")  # single-channel modes whose values are class ids


def detection_collate(batch: Sequence[tuple]) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """[(image, target), ...] -> (images, targets) as lists: torchvision detectors take images of any sizes."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def segmentation_collate(
    batch: Sequence[tuple[torch.Tensor, torch.Tensor]], ignore_index: int = 255
) -> tuple[torch.Tensor, torch.Tensor]:
    """[(image (3, H_i, W_i), mask (H_i, W_i)), ...] -> images (N, 3, H, W), masks (N, H, W) at the largest size;
    smaller items are padded at the bottom/right with 0 (images) and ``ignore_index`` (masks)."""
    height = max(image.shape[-2] for image, _ in batch)
    width = max(image.shape[-1] for image, _ in batch)
    images, masks = [], []
    for image, mask in batch:
        pad = (0, width - image.shape[-1], 0, height - image.shape[-2])  # left, right, top, bottom
        images.append(F.pad(image, pad))
        masks.append(F.pad(mask, pad, value=ignore_index))
    return torch.stack(images), torch.stack(masks)


class _CocoImages(CocoDetection):
    """torchvision's ``CocoDetection`` opening images with :func:`biformer.images.open_image` (pixel limit)."""

    def _load_image(self, id: int) -> Image.Image:  # noqa: A002 - torchvision's signature
        return open_image(Path(self.root) / self.coco.loadImgs(id)[0]["file_name"])


class CocoDetectionDataset(Dataset):
    """COCO-format detection data in torchvision's detection format.

    Uses torchvision's ``CocoDetection`` and its v2 wrapper (boxes to xyxy, polygons/RLE to masks with
    pycocotools). Crowd annotations and boxes without area are dropped. With ``contiguous_labels`` the
    category ids (sorted) become 1..K and ``num_classes`` is K + 1; otherwise the file's ids are kept and
    ``num_classes`` is the largest id + 1 (torchvision's COCO models use 91).

    Items: (image float (3, H, W) in [0, 1], {"boxes": float (K, 4) xyxy, "labels": int64 (K,),
    "masks": uint8 (K, H, W) (with ``with_masks``), "image_id": int}).

    Raises:
        FileNotFoundError: the image folder or the annotation file does not exist.
        ValueError: the annotation file is not COCO-format JSON.
    """

    def __init__(
        self, image_dir: str | os.PathLike, annotation_file: str | os.PathLike, with_masks: bool = True,
        contiguous_labels: bool = True,
    ) -> None:
        from torchvision.datasets import wrap_dataset_for_transforms_v2

        image_dir, annotation_file = Path(image_dir), Path(annotation_file)
        if not image_dir.is_dir():
            raise FileNotFoundError(f"image_dir: no such folder: {image_dir}")
        if not annotation_file.is_file():
            raise FileNotFoundError(f"annotation_file: no such file: {annotation_file}")
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                coco = _CocoImages(str(image_dir), str(annotation_file))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError) as error:
            raise ValueError(f"annotation_file: {annotation_file} is not COCO-format JSON "
                             f"({type(error).__name__}: {error})") from error
        keys = ("boxes", "labels", "iscrowd", "image_id") + (("masks",) if with_masks else ())
        self.dataset = wrap_dataset_for_transforms_v2(coco, target_keys=keys)
        self.with_masks = with_masks
        categories = sorted(coco.coco.getCatIds())
        if contiguous_labels:
            self.label_of_category = {category: index + 1 for index, category in enumerate(categories)}
            self.num_classes = len(categories) + 1
        else:
            self.label_of_category = {category: category for category in categories}
            self.num_classes = max(categories, default=0) + 1
        names = {c["id"]: c["name"] for c in coco.coco.loadCats(categories)}
        self.class_names = ("background", *(names[c] for c in categories))

    def __len__(self) -> int:
        return len(self.dataset)

    def source(self, index: int) -> str:
        """The image file of item ``index`` (for messages)."""
        coco = self.dataset._dataset  # torchvision's CocoDetection inside the v2 wrapper
        return str(Path(coco.root) / coco.coco.loadImgs(coco.ids[index])[0]["file_name"])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image, raw = self.dataset[index]
        image = TF.to_dtype(TF.to_image(image), torch.float32, scale=True)  # (3, H, W) in [0, 1]
        height, width = image.shape[-2:]
        target = {"image_id": int(raw["image_id"])}
        if "boxes" in raw:
            boxes = TF.convert_bounding_box_format(raw["boxes"], new_format=BoundingBoxFormat.XYXY).as_subclass(
                torch.Tensor).float().reshape(-1, 4)
            keep = (torch.as_tensor(raw["iscrowd"]) == 0) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            labels = torch.tensor([self.label_of_category[int(c)] for c in raw["labels"]], dtype=torch.int64)
            target["boxes"], target["labels"] = boxes[keep], labels[keep]
            if self.with_masks:
                target["masks"] = raw["masks"].as_subclass(torch.Tensor)[keep].to(torch.uint8)
        else:  # an image without annotations
            target["boxes"], target["labels"] = torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
            if self.with_masks:
                target["masks"] = torch.zeros(0, height, width, dtype=torch.uint8)
        return image, target


def _read_mask(path: Path) -> np.ndarray:
    """A class-index mask (single-channel PNG: mode L, P or I) as int64 (H, W)."""
    try:
        with Image.open(path) as image:
            if image.width * image.height > DEFAULT_MAX_PIXELS:
                raise ImageError(f"mask: {path} has {image.width}x{image.height} pixels, over the limit")
            if image.mode not in MASK_MODES:
                raise ImageError(f"mask: {path} must be a single-channel image of class ids (mode L, P or I), "
                                 f"got mode {image.mode}")
            return np.asarray(image).astype(np.int64)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageError(f"mask: cannot read {path} ({type(error).__name__}: {error})") from error


class MaskFolderDataset(Dataset):
    """Segmentation data as two folders: images, and masks of the same file stem holding class ids.

    ``image_dir/0001.jpg`` pairs with ``mask_dir/0001.png``; mask pixels are class ids in 0..num_classes-1 or
    ``ignore_index`` (palette PNGs keep their indices). Items: (image float (3, H, W) in [0, 1], mask int64
    (H, W)). Batch with :func:`segmentation_collate` when sizes differ.

    Raises:
        FileNotFoundError: a folder is missing, holds no image, or images lack masks (listed).
        ValueError (``ImageError``) on reading an item: unreadable files, a mask of another size than its
            image, or class ids out of range.
    """

    def __init__(
        self, image_dir: str | os.PathLike, mask_dir: str | os.PathLike, num_classes: int, ignore_index: int = 255,
        mask_suffix: str = ".png",
    ) -> None:
        image_dir, mask_dir = Path(image_dir), Path(mask_dir)
        for name, folder in (("image_dir", image_dir), ("mask_dir", mask_dir)):
            if not folder.is_dir():
                raise FileNotFoundError(f"{name}: no such folder: {folder}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected an integer >= 1, got {num_classes!r}")
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise FileNotFoundError(f"image_dir: no image ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}")
        pairs = [(image, mask_dir / (image.stem + mask_suffix)) for image in images]
        unpaired = [image.name for image, mask in pairs if not mask.is_file()]
        if unpaired:
            raise FileNotFoundError(
                f"mask_dir: {len(unpaired)} image(s) have no mask named <stem>{mask_suffix} in {mask_dir}: "
                + ", ".join(unpaired[:5]) + (" ..." if len(unpaired) > 5 else "")
            )
        self.pairs, self.num_classes, self.ignore_index = pairs, num_classes, ignore_index

    def __len__(self) -> int:
        return len(self.pairs)

    def source(self, index: int) -> str:
        """The image and mask files of item ``index`` (for messages)."""
        image_path, mask_path = self.pairs[index]
        return f"{image_path} (mask {mask_path})"

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.pairs[index]
        image = TF.to_dtype(TF.to_image(open_image(image_path)), torch.float32, scale=True)  # (3, H, W)
        mask = _read_mask(mask_path)
        if mask.shape != tuple(image.shape[-2:]):
            raise ImageError(f"mask: {mask_path} is {mask.shape[1]}x{mask.shape[0]}, its image {image_path.name} "
                             f"is {image.shape[-1]}x{image.shape[-2]}")
        bad = (mask >= self.num_classes) & (mask != self.ignore_index)
        if bad.any():
            raise ImageError(f"mask: {mask_path} holds class ids {sorted(set(mask[bad].tolist()))[:5]}, expected "
                             f"0..{self.num_classes - 1} or ignore_index {self.ignore_index}")
        return image, torch.from_numpy(mask)
