"""Sharded checkpoint files that load without running a stranger's code.

``torch.distributed.checkpoint`` (DCP) keeps two things a hostile file can turn into code:

- its ``.metadata`` file, written with ``pickle.dump`` and read with a plain ``pickle.load``
  (``FileSystemReader.read_metadata``): unpickling runs whatever the file names;
- every value of the state dict that is not a tensor (the optimizer's hyperparameters), written
  with ``torch.save`` and read with ``torch.load(weights_only=False)``
  (``DefaultLoadPlanner.load_bytes``).

This module replaces both readers and the metadata writer and keeps DCP's planners and shard
files as they are:

- :class:`JsonMetadataWriter` writes the metadata as JSON (``.metadata.json``) and no pickle;
  :class:`JsonMetadataReader` reads only that file, checks every field (types, a known dtype,
  shard files named inside the folder, byte ranges inside the files, sizes under a limit) and
  never opens a ``.metadata`` pickle;
- :class:`WeightsOnlyLoadPlanner` reads non-tensor values with ``torch.load(weights_only=True)``,
  PyTorch's restricted unpickler (numbers, strings, lists, tuples, dicts, tensors: nothing that
  can name a function); tensors already go through it in DCP.

A checkpoint written by an earlier textenvs (a pickled ``.metadata``) is refused;
:func:`convert_pickled_metadata` converts one whose origin you trust.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

METADATA_FILE = ".metadata.json"
PICKLED_METADATA_FILE = ".metadata"
FORMAT = "textenvs-dcp-metadata"
VERSION = 1
MAX_METADATA_BYTES = 64 * 2**20
"""A metadata file larger than this is refused unread (a 124M model's is about 100 KB)."""
MAX_ELEMENTS = 2**36
"""No tensor of a checkpoint may declare more elements than this (256 GiB of float32)."""
DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}


def metadata_to_json(metadata: Metadata) -> dict:
    """DCP's metadata as plain JSON values (what :class:`JsonMetadataWriter` writes)."""
    tensors = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, BytesStorageMetadata):
            tensors[fqn] = {"kind": "bytes"}
            continue
        tensors[fqn] = {
            "kind": "tensor",
            "dtype": str(md.properties.dtype).removeprefix("torch."),
            "requires_grad": bool(md.properties.requires_grad),
            "size": list(md.size),
            "chunks": [{"offsets": list(c.offsets), "sizes": list(c.sizes)} for c in md.chunks],
        }
    storage = [
        {
            "fqn": index.fqn,
            "offset": None if index.offset is None else list(index.offset),
            "index": index.index,
            "file": info.relative_path,
            "start": info.offset,
            "length": info.length,
        }
        for index, info in (metadata.storage_data or {}).items()
    ]
    planner = metadata.planner_data or {}
    return {
        "format": FORMAT,
        "version": VERSION,
        "dcp_version": metadata.version,
        "state_dict": tensors,
        "planner_data": {fqn: list(path) for fqn, path in planner.items()},
        "storage": storage,
    }


class JsonMetadataWriter(FileSystemWriter):
    """DCP's file system writer, with the metadata written as JSON instead of a pickle."""

    def finish(self, metadata: Metadata, results: list) -> None:
        metadata.version = CURRENT_DCP_VERSION
        storage = {}
        for write_results in results:
            storage.update({r.index: r.storage_data for r in write_results})
        for info in storage.values():
            if info.transform_descriptors:  # we configure no stream transform
                raise ValueError(f"unexpected stream transforms {info.transform_descriptors}")
        metadata.storage_data = storage
        text = json.dumps(metadata_to_json(metadata))
        folder = Path(self.path)
        tmp = folder / (METADATA_FILE + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / METADATA_FILE)


class JsonMetadataReader(FileSystemReader):
    """DCP's file system reader that reads the JSON metadata of :class:`JsonMetadataWriter`,
    every field checked, and never a pickle."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_json_metadata(Path(self.path))
        metadata.storage_meta = StorageMeta(load_id=self.load_id)
        return metadata


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, with non-tensor values read by PyTorch's restricted
    unpickler (``weights_only=True``) instead of a full one."""

    def load_bytes(self, read_item, value) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def read_json_metadata(folder: Path) -> Metadata:
    """The :data:`METADATA_FILE` of a sharded checkpoint folder as DCP's ``Metadata``; a
    ValueError naming the file and the field for anything we did not write."""
    path = folder / METADATA_FILE
    if not path.is_file():
        if (folder / PICKLED_METADATA_FILE).exists():
            raise ValueError(
                f"{folder}: its metadata is a pickle ({PICKLED_METADATA_FILE}, written by "
                "torch.distributed.checkpoint itself or an earlier textenvs); unpickling a file "
                "can run any code, so it was not read. If you trust where it came from, convert "
                "it once with agents.shards.convert_pickled_metadata(folder)."
            )
        raise ValueError(f"{folder}: no {METADATA_FILE}; not a textenvs sharded checkpoint.")
    if path.is_symlink() or path.stat().st_size > MAX_METADATA_BYTES:
        raise ValueError(
            f"{path}: a symlink or larger than {MAX_METADATA_BYTES} bytes; not ours, not read."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: not readable JSON ({e}).") from e
    return _metadata_from_json(path, folder, data)


def _metadata_from_json(path: Path, folder: Path, data) -> Metadata:
    return _MetadataReader(path, folder).metadata(data)


class _MetadataReader:
    """Turns the JSON of :data:`METADATA_FILE` into DCP's ``Metadata``, every field checked; a
    ValueError names the file, the field, what it holds and what it should."""

    def __init__(self, path: Path, folder: Path) -> None:
        self.path, self.folder = path, folder
        self.file_sizes: dict[str, int] = {}

    def fail(self, field: str, value, expected: str):
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise ValueError(f"{self.path}: field {field} is {shown}; expected {expected}.")

    def ints(self, field: str, value, minimum: int = 0) -> list[int]:
        if not (isinstance(value, list) and len(value) <= 16):
            self.fail(field, value, "a list of at most 16 ints")
        for v in value:
            if type(v) is not int or v < minimum:
                self.fail(field, value, f"a list of ints >= {minimum}")
        return value

    def metadata(self, data) -> Metadata:
        if not isinstance(data, dict):
            self.fail("(the whole file)", data, "a JSON object")
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            shown = (data.get("format"), data.get("version"))
            self.fail("'format' / 'version'", shown, f"{FORMAT!r} 1")
        version = data.get("dcp_version")
        if version is not None and not isinstance(version, str):
            self.fail("'dcp_version'", version, "a string or null")
        tensors, planner, storage = (data.get(k) for k in ("state_dict", "planner_data", "storage"))
        if not isinstance(tensors, dict):
            self.fail("'state_dict'", tensors, "an object")
        if not isinstance(planner, dict):
            self.fail("'planner_data'", planner, "an object")
        for fqn, keys in planner.items():
            if not isinstance(keys, list) or not all(type(k) in (str, int) for k in keys):
                self.fail(f"'planner_data'[{fqn!r}]", keys, "a list of strings and ints")
        if not isinstance(storage, list):
            self.fail("'storage'", storage, "a list")
        return Metadata(
            state_dict_metadata={
                fqn: self.entry(f"'state_dict'[{fqn!r}]", md) for fqn, md in tensors.items()
            },
            planner_data={fqn: tuple(keys) for fqn, keys in planner.items()},
            storage_data=dict(self.storage(f"'storage'[{i}]", e) for i, e in enumerate(storage)),
            version=version,
        )

    def entry(self, where: str, md):
        """One state-dict entry: a tensor's dtype, size and chunks, or a bytes value."""
        if not isinstance(md, dict) or md.get("kind") not in ("tensor", "bytes"):
            self.fail(where, md, "an object of kind 'tensor' or 'bytes'")
        if md["kind"] == "bytes":
            return BytesStorageMetadata()
        if not isinstance(md.get("dtype"), str) or md["dtype"] not in DTYPES:
            self.fail(f"{where}['dtype']", md.get("dtype"), f"one of {sorted(DTYPES)}")
        if type(md.get("requires_grad")) is not bool:
            self.fail(f"{where}['requires_grad']", md.get("requires_grad"), "a boolean")
        size = self.ints(f"{where}['size']", md.get("size"))
        if math.prod(size) > MAX_ELEMENTS:
            self.fail(f"{where}['size']", size, f"at most {MAX_ELEMENTS} elements")
        chunks = md.get("chunks")
        if not isinstance(chunks, list):
            self.fail(f"{where}['chunks']", chunks, "a list")
        parsed = [self.chunk(f"{where}['chunks'][{i}]", c, size) for i, c in enumerate(chunks)]
        properties = TensorProperties(dtype=DTYPES[md["dtype"]], requires_grad=md["requires_grad"])
        return TensorStorageMetadata(properties, torch.Size(size), parsed)

    def chunk(self, where: str, chunk, size: list[int]) -> ChunkStorageMetadata:
        """One block of a tensor: its offsets and sizes, inside the tensor."""
        if not isinstance(chunk, dict):
            self.fail(where, chunk, "an object")
        offsets = self.ints(f"{where}['offsets']", chunk.get("offsets"))
        sizes = self.ints(f"{where}['sizes']", chunk.get("sizes"))
        if (
            len(offsets) != len(size)
            or len(sizes) != len(size)
            or any(o + s > n for o, s, n in zip(offsets, sizes, size))
        ):
            self.fail(where, chunk, f"a block inside a tensor of size {size}")
        return ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))

    def storage(self, where: str, entry) -> tuple[MetadataIndex, _StorageInfo]:
        """Where one block's bytes are: a shard file of the folder (no path, no symlink) and a
        byte range inside it."""
        if not isinstance(entry, dict) or not isinstance(entry.get("fqn"), str):
            self.fail(where, entry, "an object with a string 'fqn'")
        name = entry.get("file")
        if not (isinstance(name, str) and name and name == Path(name).name and name[0] != "."):
            self.fail(f"{where}['file']", name, "the name of a shard file in the folder")
        if name not in self.file_sizes:
            shard = self.folder / name
            if shard.is_symlink() or not shard.is_file():
                self.fail(f"{where}['file']", name, "a shard file present in the folder")
            self.file_sizes[name] = shard.stat().st_size
        start, length = entry.get("start"), entry.get("length")
        if not (type(start) is int and type(length) is int and start >= 0 and length >= 0):
            self.fail(f"{where}['start'/'length']", (start, length), "ints >= 0")
        if start + length > self.file_sizes[name]:
            size = self.file_sizes[name]
            self.fail(f"{where}['length']", length, f"a range inside {name} ({size} bytes)")
        offset, index = entry.get("offset"), entry.get("index")
        if offset is not None:
            offset = torch.Size(self.ints(f"{where}['offset']", offset))
        if index is not None and type(index) is not int:
            self.fail(f"{where}['index']", index, "an int or null")
        return MetadataIndex(entry["fqn"], offset, index), _StorageInfo(name, start, length)


def save(state: dict, folder: str | os.PathLike) -> None:
    """Every process writes its shards of ``state`` into ``folder``, the metadata as JSON
    (collective under a process group)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state, storage_writer=JsonMetadataWriter(str(folder)))


def load(state: dict, folder: str | os.PathLike) -> None:
    """Read a :func:`save` checkpoint into ``state`` in place (collective under a process group);
    nothing goes through a full unpickler."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    read_json_metadata(Path(folder))  # every process raises our message itself, at once
    try:
        dcp.load(
            state,
            storage_reader=JsonMetadataReader(str(folder)),
            planner=WeightsOnlyLoadPlanner(),
        )
    except CheckpointException as e:  # DCP wraps each process's error; give the first one
        first = next(iter(e.failures.values()), None)
        cause = first[0] if isinstance(first, tuple) else first
        raise ValueError(f"{folder}: cannot be read ({type(cause).__name__}: {cause}).") from e


def convert_pickled_metadata(folder: str | os.PathLike) -> Path:
    """Write :data:`METADATA_FILE` for a sharded checkpoint folder whose metadata is DCP's pickle.

    This UNPICKLES ``<folder>/.metadata``, which runs any code the file names: call it only on a
    checkpoint whose origin you trust (one you wrote with an earlier textenvs). The result is
    then read like every checkpoint, checked field by field.
    """
    import pickle

    folder = Path(folder)
    if (folder / "shards" / PICKLED_METADATA_FILE).is_file():
        folder = folder / "shards"  # a token-PPO checkpoint folder: its shards live there
    with open(folder / PICKLED_METADATA_FILE, "rb") as f:
        metadata = pickle.load(f)  # noqa: S301  (the caller vouches for this file)
    (folder / METADATA_FILE).write_text(json.dumps(metadata_to_json(metadata)), encoding="utf-8")
    read_json_metadata(folder)  # what we wrote reads back
    return folder / METADATA_FILE
