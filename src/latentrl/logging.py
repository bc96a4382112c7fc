"""One logging facade: TensorBoard scalars/text/images, the console, and a JSONL copy of every
logged scalar (metrics.jsonl) that scripts can read without TensorBoard."""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger("latentrl")


def finite_or_none(obj):
    """NaN/inf floats -> None, recursively: JSON has no NaN token, and strict parsers (jq, JS,
    Python's json with parse_constant raising) reject Python's default `NaN` output."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def strict_json(obj, **kwargs) -> str:
    """json.dumps that writes null for non-finite floats and can never emit NaN/Infinity."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)


def as_floats(metrics: dict) -> dict:
    """Numbers and 0-d tensors -> floats. Metrics stay on their device until they are logged; here
    all of a device's metrics are read in one copy (one host-device sync, not one per metric)."""
    by_device: dict[torch.device, list[str]] = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor):
            by_device.setdefault(v.device, []).append(k)
    read = {}
    for keys in by_device.values():
        read.update(zip(keys, torch.stack([metrics[k].detach().reshape(()).double() for k in keys]).tolist()))
    return {k: read[k] if k in read else float(v) for k, v in metrics.items()}


class Logger:
    def __init__(self, run_dir: Path, purge_step: int | None = None):
        """purge_step: on resume, drop events at or after this step that the killed run wrote past
        its last checkpoint, so TensorBoard shows one curve with no duplicated steps."""
        self.tb_dir = Path(run_dir) / "tb"
        self.writer = SummaryWriter(str(self.tb_dir), purge_step=purge_step, flush_secs=30)
        self.jsonl_path = Path(run_dir) / "metrics.jsonl"
        if purge_step is not None and self.jsonl_path.exists():
            kept = [ln for ln in self.jsonl_path.read_text().splitlines() if ln and json.loads(ln)["step"] < purge_step]
            self.jsonl_path.write_text("".join(ln + "\n" for ln in kept))
        self.jsonl = self.jsonl_path.open("a", buffering=1)  # line-buffered: readable while the run goes on

    def scalars(self, metrics: dict, step: int) -> dict[str, float]:
        """metrics: 'namespace/name' -> number or 0-d tensor. Returns them as floats."""
        values = as_floats(metrics)
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.jsonl.write(strict_json({"step": step, **values}) + "\n")
        return values

    def text(self, tag: str, text: str, step: int = 0) -> None:
        self.writer.add_text(tag, text, step)

    def image(self, tag: str, img: np.ndarray, step: int) -> None:
        """img: CHW, uint8 or float in [0, 1]."""
        img = np.asarray(img)
        if img.dtype == np.uint8:
            img = img.astype(np.float32) / 255.0
        self.writer.add_image(tag, np.clip(img, 0, 1), step, dataformats="CHW")

    def video(self, tag: str, frames: list[np.ndarray], step: int, fps: int = 25, max_side: int = 160) -> None:
        """Frames (HWC uint8) as an animated GIF in TensorBoard's image tab. add_video needs
        moviepy.editor, gone in moviepy 2.x, and then logs nothing; a GIF needs only Pillow."""
        from PIL import Image
        from tensorboard.compat.proto.summary_pb2 import Summary

        h, w = frames[0].shape[:2]
        scale = min(1.0, max_side / max(h, w))
        size = (max(1, int(w * scale)), max(1, int(h * scale)))
        images = [Image.fromarray(np.asarray(f, dtype=np.uint8)).resize(size) for f in frames]
        buf = io.BytesIO()
        images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        image = Summary.Image(height=size[1], width=size[0], colorspace=3, encoded_image_string=buf.getvalue())
        self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def hparams(self, hparams: dict, metrics: dict) -> None:
        """One HParams entry per run, in the run's own event directory, so a sweep compares in TensorBoard."""
        self.writer.add_hparams(hparams, metrics, run_name=".")

    def flush(self) -> None:
        self.writer.flush()
        self.jsonl.flush()

    def close(self) -> None:
        self.writer.close()
        self.jsonl.close()
