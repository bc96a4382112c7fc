"""Atomic full-state checkpoints, loaded with weights_only=True (a checkpoint never runs code).

Everything stored is a tensor or a plain Python container: configs as plain dicts, RNG states as
tensors/tuples/dicts of ints."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

FORMAT_VERSION = 1
# config keys that must agree between a checkpoint and the config that loads it
FINGERPRINT_KEYS = ("env.id", "env.pixels", "env.resize", "env.grayscale", "env.frame_stack", "agent._target_",
                    "encoder._target_")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the config; the message says what to do."""


def atomic_save(obj, path: Path) -> None:
    """Write to a temp file in the same directory, fsync, then rename over the target: a crash
    mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: is this a latentrl run directory that reached a checkpoint?")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise CheckpointError(f"could not read checkpoint {path} ({type(e).__name__}: {e})") from None


def _select(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def fingerprint(cfg: dict) -> dict:
    return {k: _select(cfg, k) for k in FINGERPRINT_KEYS}


def check_compatible(ckpt: dict, cfg: dict, path: Path) -> None:
    """Refuse a checkpoint written under another env/agent/encoder than `cfg` describes."""
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {ckpt.get('format_version')}, this latentrl reads "
                              f"{FORMAT_VERSION}")
    mine, theirs = fingerprint(cfg), ckpt["fingerprint"]
    diffs = [f"{k}: checkpoint={theirs.get(k)!r} config={mine[k]!r}" for k in FINGERPRINT_KEYS if theirs.get(k) != mine[k]]
    if diffs:
        raise CheckpointError(f"checkpoint {path} does not fit this config ({'; '.join(diffs)}). "
                              "Load it with the config it was trained with (its run directory's config.yaml).")


def rng_state() -> dict:
    """Every global RNG stream: torch CPU, torch CUDA (one state per device; [] without CUDA), Python,
    NumPy's legacy generator."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda, "python": random.getstate(),
            "numpy_legacy": _np_legacy_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []  # absent in older checkpoints; empty when written without CUDA
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    random.setstate(_to_tuple(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy_legacy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def _np_legacy_state():
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
