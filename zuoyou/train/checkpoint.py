"""Atomic training checkpoints: model + optimiser + loop state, resumable after any interruption.

Tensors go to safetensors (model, optimiser state flattened); the small loop state (step, RNG
states, elapsed time) to JSON. Tensors go to new files (``model-<tag>.safetensors``) that only
the new ``state.json`` names, and ``state.json`` is replaced atomically last: a run killed at any
instant leaves either the previous or the new checkpoint, never a torn one. Older files are
removed after the switch. (Checkpoints of the first layout, ``model.safetensors``, still load.)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(path, model: torch.nn.Module, opt: torch.optim.Optimizer | None = None, **state) -> None:
    """``path`` is a folder: model.safetensors, optim.safetensors, state.json."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tag = f"{time.time_ns():x}"
    files = {"model": f"model-{tag}.safetensors"}
    save_file(tensors, str(path / files["model"]))
    if opt is not None:
        flat, meta = {}, {}
        osd = opt.state_dict()
        for pid, st in osd["state"].items():
            for name, v in st.items():
                if torch.is_tensor(v):
                    flat[f"{pid}.{name}"] = v.contiguous()
                else:
                    meta[f"{pid}.{name}"] = v
        files["optim"] = f"optim-{tag}.safetensors"
        save_file(flat, str(path / files["optim"]))
        state["_optim_groups"] = osd["param_groups"]
        state["_optim_meta"] = meta
    state["_files"] = files
    # RNG states are small tuples of ints: JSON via lists (pickle-free)
    blob = json.dumps(state, default=_jsonable).encode()
    _atomic_write_bytes(path / "state.json", blob)  # the switch
    for f in path.glob("*.safetensors"):
        if f.name not in files.values():
            f.unlink(missing_ok=True)


def _jsonable(o):
    if isinstance(o, tuple):
        return list(o)
    if torch.is_tensor(o):
        return o.tolist()
    raise TypeError(f"cannot store {type(o).__name__} in a checkpoint state")


def _tuplify(x):
    return tuple(_tuplify(i) for i in x) if isinstance(x, list) else x


def load_checkpoint(path, model: torch.nn.Module, opt: torch.optim.Optimizer | None = None) -> dict:
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    files = state.pop("_files", {"model": "model.safetensors", "optim": "optim.safetensors"})
    model.load_state_dict(load_file(str(path / files["model"])))
    if opt is not None and "optim" in files and (path / files["optim"]).exists():
        flat = load_file(str(path / files["optim"]))
        st: dict = {}
        for key, v in flat.items():
            pid, name = key.split(".", 1)
            st.setdefault(int(pid), {})[name] = v
        for key, v in state.pop("_optim_meta", {}).items():
            pid, name = key.split(".", 1)
            st.setdefault(int(pid), {})[name] = v
        opt.load_state_dict({"state": st, "param_groups": state.pop("_optim_groups")})
    if "rng" in state:
        state["rng"] = _tuplify(state["rng"])
    return state


def exists(path) -> bool:
    return (Path(path) / "state.json").is_file()


__all__ = ["save_checkpoint", "load_checkpoint", "exists"]
