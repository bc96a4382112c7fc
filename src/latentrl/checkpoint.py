"""Atomic full-state checkpoints, loaded with weights_only=True (a checkpoint never runs code).

Everything stored is a tensor or a plain Python container: configs as plain dicts, RNG states as
tensors/tuples/dicts of ints."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

FORMAT_VERSION = 1
# config keys that must agree between a checkpoint and the config that loads it
FINGERPRINT_KEYS = ("env.id", "env.task", "env.map", "env.reward", "env.pixels", "env.resize", "env.grayscale", "env.frame_stack",
                    "agent._target_", "encoder._target_")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the config; the message says what to do."""


class UpdateInterrupted(Exception):
    """An agent may raise this from `update()` when `self.should_stop()` (set by the trainer) turned
    true inside a long loop (a model retrain), *after* putting its state back to what it was before
    this update. The trainer then does not count the update, checkpoints, and the resumed run
    repeats the whole update: an exact resume. Agents that cannot roll back should instead finish
    the loop early and return normally (a consistent, but not bit-exact, resume)."""


def nonfinite(tree, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a nested dict/list/tuple holding NaN or inf. One
    device sync for the common all-finite case; names are only looked up when something is bad."""
    leaves: list[tuple[str, torch.Tensor]] = []

    def walk(node, name):
        if torch.is_tensor(node):
            if node.is_floating_point() or node.is_complex():
                leaves.append((name, node))
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{name}.{i}" if name else str(i))

    walk(tree, prefix)
    if not leaves:
        return []
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for _, t in leaves:
        by_device.setdefault(t.device, []).append(torch.isfinite(t.detach()).all())
    if all(bool(torch.stack(flags).all()) for flags in by_device.values()):
        return []
    return [name for name, t in leaves if not bool(torch.isfinite(t.detach()).all())]


def atomic_save(obj, path: Path, keep_previous: Path | None = None) -> None:
    """Write to a temp file in the same directory, fsync, then rename over the target: a crash
    mid-write leaves the previous checkpoint intact. With `keep_previous`, the file being replaced
    is kept there (prev.pt beside last.pt), so one bad checkpoint never leaves nothing to resume."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    if keep_previous is not None and path.exists():
        prev_tmp = Path(keep_previous).with_name(f".{Path(keep_previous).name}.{os.getpid()}.tmp")
        try:  # a hard link costs no copy; path stays in place until the final rename
            os.link(path, prev_tmp)
        except OSError:  # filesystems without hard links
            shutil.copy2(path, prev_tmp)
        os.replace(prev_tmp, keep_previous)
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
