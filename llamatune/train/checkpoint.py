"""Checkpoints that survive SIGKILL at any instant, and exact resume.

A checkpoint is a folder `checkpoints/step-00000042/` holding:
  adapter.safetensors  trainable (LoRA) tensors, in training dtype
  optimizer.pt         optimizer state (tensors; read back with torch.load(weights_only=True))
  rng-<rank>.pt        python / numpy / torch / cuda generator states, one file per process
  state.json           step, epoch, tokens, last loss, scheduler state, held-out loss before training,
                       fingerprints (strict JSON: a best held-out loss not measured yet, infinite in
                       memory, is written as null)
  manifest.json        sha256 of every file above; written last
It is written in a hidden staging folder beside the final one, every file fsynced, the manifest last,
then renamed into place: a folder named step-N without a valid manifest never exists, so a reader
sees a complete checkpoint or none. Retention deletes older checkpoints only after the new one is in
place, and only folders that carry a manifest.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

from llamatune import strictjson
from llamatune.errors import LlamatuneError
from llamatune.fingerprint import sha256_file

FILES = ("adapter.safetensors", "optimizer.pt", "state.json")  # plus rng-<rank>.pt per process
FAULT_ENV = "LLAMATUNE_FAULT"  # test hook: kill the process at a named point, or make it slow there (see fault())


def fault(point: str) -> None:
    """SIGKILLs this process when $LLAMATUNE_FAULT names `point`: how the tests prove that a kill at
    any instant of checkpointing leaves a resumable run. `slow:SECONDS:POINT` sleeps there instead (how the tests
    make a step slow, to see that progress lines keep coming). Does nothing otherwise."""
    wanted = os.environ.get(FAULT_ENV)
    if wanted == point:
        os.kill(os.getpid(), signal.SIGKILL)
    elif wanted and wanted.startswith("slow:") and wanted.split(":", 2)[2:] == [point]:
        time.sleep(float(wanted.split(":")[1]))


def save(checkpoints: Path, step: int, model, optimizer, state: dict, keep_last: int, acc) -> Path:
    """Writes checkpoint `step` atomically and applies retention. Returns its folder.

    Every process writes its own RNG file; the main process writes the rest, the manifest and the
    rename, with barriers in between (no-ops in a single process).
    """
    import torch
    from safetensors.torch import save_file

    final = checkpoints / f"step-{step:08d}"
    staging = checkpoints / f".staging-step-{step:08d}"
    if acc.is_main_process:
        checkpoints.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # left by a process killed while saving this step
        staging.mkdir()
    acc.wait_for_everyone()
    torch.save(_rng_state(), staging / f"rng-{acc.process_index}.pt")
    acc.wait_for_everyone()
    if not acc.is_main_process:
        acc.wait_for_everyone()
        return final
    trainable = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trainable, staging / "adapter.safetensors")
    fault(f"after-adapter:{step}")
    torch.save(optimizer.state_dict(), staging / "optimizer.pt")
    fault(f"after-optimizer:{step}")
    strictjson.write(staging / "state.json", state)
    names = list(FILES) + [f"rng-{r}.pt" for r in range(acc.num_processes)]
    for name in names:
        _fsync(staging / name)
    fault(f"before-manifest:{step}")
    manifest = {"step": step, "processes": acc.num_processes, "files": {name: sha256_file(staging / name) for name in names}}
    strictjson.write(staging / "manifest.json", manifest)
    _fsync(staging / "manifest.json")
    fault(f"before-rename:{step}")
    if final.exists():
        shutil.rmtree(final)  # only a re-save of the same step after a resume can get here
    staging.rename(final)
    _fsync_dir(checkpoints)
    _retain(checkpoints, keep_last, step)
    acc.wait_for_everyone()
    return final


def verify(path: Path) -> dict:
    """Checks a checkpoint's manifest and checksums; returns its manifest.

    Raises:
        LlamatuneError: Naming the missing or corrupt file.
    """
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise LlamatuneError(f"{path} is not a complete llamatune checkpoint: manifest.json is missing")
    manifest = json.loads(manifest_path.read_text())
    for name in list(FILES) + [f"rng-{r}.pt" for r in range(manifest.get("processes", 1))]:
        file = path / name
        if not file.is_file():
            raise LlamatuneError(f"checkpoint {path}: {name} is missing; it cannot be resumed exactly")
        if sha256_file(file) != manifest["files"].get(name):
            raise LlamatuneError(f"checkpoint {path}: {name} does not match its checksum (corrupt or modified)")
    return manifest


def latest(checkpoints: Path, warn=print) -> Path | None:
    """The newest checkpoint that verifies; corrupt or partial ones are skipped with a warning."""
    if not checkpoints.is_dir():
        return None
    for path in sorted(checkpoints.glob("step-*"), reverse=True):
        try:
            verify(path)
            return path
        except (LlamatuneError, ValueError) as exc:
            warn(f"skipping {path.name}: {exc}")
    return None


def load(path: Path, model, optimizer) -> dict:
    """Restores adapter tensors and optimizer state from a verified checkpoint; returns state.json.

    The RNG states are restored separately (restore_rng), as the very last step before training
    continues, so nothing done while rebuilding the model can consume random numbers after them.
    """
    import torch
    from safetensors.torch import load_file

    verify(path)
    tensors = load_file(path / "adapter.safetensors")
    params = dict(model.named_parameters())
    missing = [n for n in tensors if n not in params] + [n for n, p in params.items() if p.requires_grad and n not in tensors]
    if missing:
        raise LlamatuneError(f"checkpoint {path} does not fit this model (e.g. {missing[0]}); was the recipe's lora section changed?")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    return json.loads((path / "state.json").read_text())


def restore_rng(path: Path, rank: int) -> None:
    """Puts every random generator of process `rank` back where it was when the checkpoint was taken."""
    import numpy as np
    import torch

    rng = torch.load(path / f"rng-{rank}.pt", weights_only=True)
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    np.random.set_state((rng["numpy"][0], np.array(rng["numpy"][1], dtype=np.uint32), *rng["numpy"][2:]))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and rng.get("cuda"):
        torch.cuda.set_rng_state_all(rng["cuda"])


def _rng_state() -> dict:
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],  # plain lists: loadable with weights_only
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def discard_unfinished(checkpoints: Path) -> None:
    """Deletes the staging folders of saves a killed process never finished (never a complete checkpoint)."""
    for stale in checkpoints.glob(".staging-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _retain(checkpoints: Path, keep_last: int, newest: int) -> None:
    complete = sorted(p for p in checkpoints.glob("step-*") if (p / "manifest.json").is_file())
    for old in complete[:-keep_last]:
        # The manifest goes first: a folder half-deleted by a kill then lacks it and is plainly not a checkpoint.
        (old / "manifest.json").unlink()
        shutil.rmtree(old)
        fault(f"during-retention:{newest}")
    # A step-N folder without a manifest is never half-written (saves rename complete folders into place):
    # it is one whose deletion a kill interrupted. Older than the newest complete one, it is only litter.
    for half_deleted in checkpoints.glob("step-*"):
        if not (half_deleted / "manifest.json").is_file() and half_deleted.name < f"step-{newest:08d}":
            shutil.rmtree(half_deleted, ignore_errors=True)
    discard_unfinished(checkpoints)


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
