"""Stored soft labels: the committee labels every augmented batch once, and students replay them.

On-the-fly post-evaluation runs every teacher on every batch of every epoch, for every
student and seed. A label store records, once per distilled set, committee and augmentation
seed, what those passes produce: the batch order of each epoch, each image's crop box and
flip, each batch's CutMix box and partners, and the committee's soft labels as float16
top-k probabilities with their class indices. A student trained from the store sees the
same batches and targets that on-the-fly training with the same augmentation stream would
give it (up to float16 rounding and the dropped tail beyond the top k); its own seed then
sets only its initial weights. Reading a store is plain tensor indexing, with no change to
PyTorch's own code.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from .augment import CropParams, CutMixParams, apply_crop, apply_cutmix
from .config import EvalConfig
from .errors import CvddError
from .progress import tqdm
from .runs import atomic_torch_save

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class LabelStore:
    """The augmentation stream and soft labels of every batch of every epoch, as tensors.

    Shapes, with E epochs, N images, P batches per epoch and k kept classes:
    order (E, N) int32, crop (E, N, 4) int16 as top, left, height, width in pixels,
    flip (E, N) bool, cutmix (E, P, 4) int16 as top, left, height, width (all zero when
    CutMix is off), partner (E, N) int16 positions within the batch, values (E, N, k)
    float16 and classes (E, N, k) int16. Row i of an epoch is the i-th image of that
    epoch's batches in order.
    """

    def __init__(self, data: dict):
        self.data = data

    @property
    def epochs(self) -> int:
        return int(self.data["order"].shape[0])

    def check(self, count: int, batch_size: int, epochs: int) -> None:
        """Raise CvddError if the store was made for another set size, batch size or epoch count."""
        made = (int(self.data["order"].shape[1]), int(self.data["batch_size"]), self.epochs)
        if made != (count, batch_size, epochs):
            raise CvddError(
                f"the label store holds {made[0]} images, batch {made[1]}, {made[2]} epochs, but this student "
                f"trains {count} images, batch {batch_size}, {epochs} epochs; delete the store to rebuild it"
            )

    def bytes_per_image_epoch(self) -> float:
        """Bytes stored per image per epoch, over every tensor of the stream."""
        keys = ("order", "crop", "flip", "cutmix", "partner", "values", "classes")
        total = sum(self.data[k].numel() * self.data[k].element_size() for k in keys)
        order = self.data["order"]
        return total / (order.shape[0] * order.shape[1])

    def describe(self) -> dict:
        return {"top_k": int(self.data["values"].shape[2]), "augment_seed": int(self.data["augment_seed"]),
                "bytes_per_image_epoch": round(self.bytes_per_image_epoch(), 2),
                "fingerprint": self.data["fingerprint"]}

    def batches(self, normalized: torch.Tensor, device: torch.device):
        """Yield (epoch, rows, crop, CutMix draw or None, augmented batch, targets), as the stream was drawn."""
        from .evaluate import batch_starts

        data = self.data
        count = normalized.shape[0]
        size = normalized.shape[-1]
        classes = int(data["num_classes"])
        starts = batch_starts(count, int(data["batch_size"]))
        for epoch in range(self.epochs):
            order = data["order"][epoch].long()
            for position, first in enumerate(starts):
                last = starts[position + 1] if position + 1 < len(starts) else count
                rows = order[first:last]
                box = data["crop"][epoch, first:last].float()
                crop = CropParams(top=box[:, 0], left=box[:, 1], height=box[:, 2], width=box[:, 3],
                                  flip=data["flip"][epoch, first:last])
                x = apply_crop(normalized[rows.to(device)], crop)
                mix = None
                if data["cutmix_on"]:
                    top, left, height, width = (int(v) for v in data["cutmix"][epoch, position])
                    mix = CutMixParams(data["partner"][epoch, first:last].long(), top, left, height, width,
                                       1.0 - height * width / float(size * size))
                    x = apply_cutmix(x, mix)
                values = data["values"][epoch, first:last].to(device, torch.float32)
                picked = data["classes"][epoch, first:last].to(device, torch.long)
                targets = torch.zeros(len(rows), classes, device=device).scatter_(1, picked, values)
                targets = targets / targets.sum(dim=1, keepdim=True)
                yield epoch, rows, crop, mix, x, targets

    @classmethod
    def load(cls, path: str | Path) -> "LabelStore":
        return cls(torch.load(path, map_location="cpu", weights_only=False))

    def save(self, path: str | Path) -> None:
        atomic_torch_save(self.data, Path(path))


def build_label_store(images: torch.Tensor, dataset, cfg: EvalConfig, committee, flip: bool, augment_seed: int,
                      top_k: int, device: torch.device, fingerprint: str, desc: str = "labels") -> LabelStore:
    """Draw the augmentation stream from `augment_seed` and record the committee's soft labels.

    Args:
        images: the distilled images, float (N, C, H, W) in [0, 1].
        committee: a :class:`cvdd.evaluate.Committee`; every teacher labels each full batch once.
        top_k: classes kept per image; the rest of the probability mass is dropped and the
            kept values are renormalised when read.
    """
    from .evaluate import augmented_batches, batch_starts, eval_batch_size

    start = time.perf_counter()
    normalized = dataset.normalize(images.to(device))
    count = len(normalized)
    batch_size = eval_batch_size(cfg, count)
    starts = batch_starts(count, batch_size)
    epochs = cfg.epochs
    k = min(top_k, dataset.num_classes)
    index_dtype = torch.int16 if max(count, dataset.num_classes) < 2**15 else torch.int32
    data = {
        "order": torch.zeros(epochs, count, dtype=torch.int32),
        "crop": torch.zeros(epochs, count, 4, dtype=torch.int16),
        "flip": torch.zeros(epochs, count, dtype=torch.bool),
        "cutmix": torch.zeros(epochs, len(starts), 4, dtype=torch.int16),
        "partner": torch.zeros(epochs, count, dtype=index_dtype),
        "values": torch.zeros(epochs, count, k, dtype=torch.float16),
        "classes": torch.zeros(epochs, count, k, dtype=index_dtype),
    }
    generator = torch.Generator().manual_seed(augment_seed)
    stream = augmented_batches(normalized, cfg, epochs, batch_size, flip, generator)
    bar = tqdm(total=epochs * len(starts), desc=desc, leave=False)
    position = 0
    for epoch, rows, crop, mix, x in stream:
        first = starts[position]
        last = first + len(rows)
        data["order"][epoch, first:last] = rows.to(torch.int32)
        data["crop"][epoch, first:last] = torch.stack([crop.top, crop.left, crop.height, crop.width], 1).to(torch.int16)
        data["flip"][epoch, first:last] = crop.flip
        if mix is not None:
            data["cutmix"][epoch, position] = torch.tensor([mix.top, mix.left, mix.height, mix.width])
            data["partner"][epoch, first:last] = mix.permutation.to(index_dtype)
        targets = committee.soft_labels(x, cfg.tau, cfg.bssl, cfg.soft_label_space)
        values, classes = targets.topk(k, dim=1)
        data["values"][epoch, first:last] = values.cpu().half()
        data["classes"][epoch, first:last] = classes.cpu().to(index_dtype)
        position = (position + 1) % len(starts)
        bar.update(1)
    bar.close()
    data.update({
        "version": FORMAT_VERSION, "fingerprint": fingerprint, "batch_size": batch_size,
        "num_classes": dataset.num_classes, "augment_seed": augment_seed, "cutmix_on": cfg.cutmix_alpha > 0,
        "teachers": list(committee.teachers), "teacher_weights": committee.weights.tolist(),
        "seconds": time.perf_counter() - start,
    })
    store = LabelStore(data)
    log.info("%s: stored %d epochs of soft labels (top %d, %.1f bytes per image per epoch) in %.1f s", desc, epochs,
             k, store.bytes_per_image_epoch(), data["seconds"])
    return store
