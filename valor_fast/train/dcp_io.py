"""torch.distributed.checkpoint read paths that never run code from the checkpoint folder.

Stock DCP (torch 2.13) unpickles two things without restriction on a load:
  * `.metadata` (FileSystemReader.read_metadata: plain `pickle.load`), and
  * every non-tensor entry of the state dict, e.g. the optimiser's param_groups (lr, betas,
    eps, ...): DefaultLoadPlanner.load_bytes calls `torch.load(weights_only=False)`.
A crafted file in a copied or shared run folder therefore executes code on `--train.resume`.
`SafeFileSystemReader` reads `.metadata` through an allow-list of exactly the classes DCP
writes for our state dicts (found by recording every global the pickles of a 1-process, a
2-rank FSDP2 and a 2-rank DDP checkpoint of the tiny model with AdamW state name: see
`DCP_METADATA_GLOBALS`), and confines every storage file it names to the checkpoint folder;
`SafeLoadPlanner` reads non-tensor entries with `weights_only=True`.  Tensors themselves are
already read with `weights_only=True` by FileSystemReader.read_data.
"""
from __future__ import annotations

import os
from typing import Any, FrozenSet

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from ..utils.safe_pickle import Global, UnsafePickleError, restricted_load

_MD = "torch.distributed.checkpoint.metadata"
DCP_METADATA_GLOBALS: FrozenSet[Global] = frozenset({
    (_MD, "Metadata"), (_MD, "MetadataIndex"), (_MD, "StorageMeta"), (_MD, "TensorProperties"),
    (_MD, "TensorStorageMetadata"), (_MD, "ChunkStorageMetadata"), (_MD, "BytesStorageMetadata"),
    (_MD, "_MEM_FORMAT_ENCODING"),                          # an Enum, rebuilt from its int value
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),                 # looks a torch.layout up by name
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),  # StorageMeta.checkpoint_id
    ("builtins", "set"), ("builtins", "frozenset"), ("collections", "OrderedDict"),
})


def _is_torch_dtype(module: str, name: str) -> bool:
    """torch.float32, torch.bfloat16, ...: TensorProperties names the dtype as a torch global."""
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


class UnsafeCheckpointError(UnsafePickleError):
    """A checkpoint file holds something a load must not run or follow."""


def _check_storage(md: Metadata, where: str) -> None:
    """Every storage entry must name a plain file inside the checkpoint folder."""
    for idx, info in (md.storage_data or {}).items():
        rel = getattr(info, "relative_path", None)
        if (not isinstance(rel, str) or not rel or rel in (".", "..") or os.path.isabs(rel) or "/" in rel
                or "\\" in rel or "\x00" in rel):
            raise UnsafeCheckpointError(f"{where}: storage entry {getattr(idx, 'fqn', idx)!r} names file "
                                        f"{rel!r} outside the checkpoint folder")
        off, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not (isinstance(off, int) and isinstance(length, int) and off >= 0 and length >= 0):
            raise UnsafeCheckpointError(f"{where}: storage entry {getattr(idx, 'fqn', idx)!r} has a bad "
                                        f"offset/length ({off!r}, {length!r})")


def read_dcp_metadata(path: str, rank: Any = None) -> Metadata:
    """The `.metadata` of the DCP checkpoint folder `path`, through the allow-list."""
    return SafeFileSystemReader(path).read_metadata(rank=rank)


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata is read with the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = str(self._get_metadata_path(kwargs.get("rank")))
        with self.fs.create_stream(path, "rb") as f:
            md = restricted_load(f, DCP_METADATA_GLOBALS, path, _is_torch_dtype)
        if not isinstance(md, Metadata):
            raise UnsafeCheckpointError(f"{path}: holds a {type(md).__name__}, not DCP Metadata")
        _check_storage(md, path)
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner reading non-tensor entries with torch.load(weights_only=True): plain
    numbers, strings, tuples, lists and dicts load; any other pickled object is refused."""

    def load_bytes(self, read_item, value) -> None:
        from torch.distributed.checkpoint._traverse import set_element
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UnsafeCheckpointError(f"checkpoint entry {fqn!r}: refused to unpickle "
                                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj
