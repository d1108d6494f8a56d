"""Read OpenAI's GPT-2 checkpoint folders: TensorFlow "V2" checkpoints, without TensorFlow.

OpenAI released GPT-2 as such a checkpoint: ``model.ckpt.index`` is an SSTable
(LevelDB table format) mapping each variable name to a ``BundleEntryProto`` that
says where its raw little-endian bytes lie in ``model.ckpt.data-00000-of-00001``.
Both formats are simple enough to read with the standard library and numpy.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gpt_classifier.model.config import GPTConfig

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48
_BLOCK_TRAILER_SIZE = 5  # 1 byte compression type + 4 bytes crc32c

# tensorflow/core/framework/types.proto DataType -> numpy dtype (little-endian).
_DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<f4"),  # DT_FLOAT
    2: np.dtype("<f8"),  # DT_DOUBLE
    3: np.dtype("<i4"),  # DT_INT32
    4: np.dtype("u1"),  # DT_UINT8
    6: np.dtype("i1"),  # DT_INT8
    9: np.dtype("<i8"),  # DT_INT64
    10: np.dtype("?"),  # DT_BOOL
    19: np.dtype("<f2"),  # DT_HALF
}
_DT_BFLOAT16 = 14


class CheckpointFormatError(ValueError):
    """A TensorFlow checkpoint file is truncated, corrupt or of an unsupported kind."""


@dataclass(frozen=True)
class _Entry:
    dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    has_slices: bool


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise CheckpointFormatError("varint runs past the end of its buffer")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """Decode a protobuf message into (field number, value) pairs, in order."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        else:
            raise CheckpointFormatError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise CheckpointFormatError("protobuf field runs past the end of its message")
        out.append((number, value))
    return out


def _parse_entry(value: bytes) -> _Entry:
    dtype, shape, shard_id, offset, size, has_slices = 0, [], 0, 0, 0, False
    for number, field in _proto_fields(value):
        if number == 1:
            dtype = int(field)
        elif number == 2:
            for dim_number, dim in _proto_fields(bytes(field)):
                if dim_number == 2:  # TensorShapeProto.dim
                    size_fields = [v for n, v in _proto_fields(bytes(dim)) if n == 1]
                    shape.append(int(size_fields[0]) if size_fields else 0)
        elif number == 3:
            shard_id = int(field)
        elif number == 4:
            offset = int(field)
        elif number == 5:
            size = int(field)
        elif number == 7:
            has_slices = True
    return _Entry(dtype, tuple(shape), shard_id, offset, size, has_slices)


def _read_block(data: bytes, offset: int, size: int) -> list[tuple[bytes, bytes]]:
    """Key/value pairs of one SSTable block (keys are prefix-compressed)."""
    end = offset + size
    if end + _BLOCK_TRAILER_SIZE > len(data):
        raise CheckpointFormatError("a table block lies past the end of the index file")
    if data[end] != 0:
        raise CheckpointFormatError(f"compressed table blocks (type {data[end]}) are not supported")
    block = data[offset:end]
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    limit = len(block) - 4 - 4 * num_restarts
    pairs: list[tuple[bytes, bytes]] = []
    key = b""
    pos = 0
    while pos < limit:
        shared, pos = _varint(block, pos)
        non_shared, pos = _varint(block, pos)
        value_len, pos = _varint(block, pos)
        key = key[:shared] + block[pos : pos + non_shared]
        pos += non_shared
        pairs.append((key, block[pos : pos + value_len]))
        pos += value_len
    return pairs


def _read_index(path: Path) -> dict[str, _Entry]:
    data = path.read_bytes()
    if len(data) < _FOOTER_SIZE:
        raise CheckpointFormatError(f"{path} is too short to be a checkpoint index")
    footer = data[-_FOOTER_SIZE:]
    (magic,) = struct.unpack_from("<Q", footer, _FOOTER_SIZE - 8)
    if magic != _TABLE_MAGIC:
        raise CheckpointFormatError(f"{path} does not end with the table magic number")
    _, pos = _varint(footer, 0)  # metaindex handle offset
    _, pos = _varint(footer, pos)  # metaindex handle size
    index_offset, pos = _varint(footer, pos)
    index_size, _ = _varint(footer, pos)
    entries: dict[str, _Entry] = {}
    for _, handle in _read_block(data, index_offset, index_size):
        block_offset, pos = _varint(handle, 0)
        block_size, _ = _varint(handle, pos)
        for key, value in _read_block(data, block_offset, block_size):
            if key:  # the empty key holds the BundleHeaderProto
                entries[key.decode("utf-8")] = _parse_entry(value)
            else:
                header = dict(_proto_fields(value))
                if header.get(2, 0) != 0:
                    raise CheckpointFormatError(f"{path} is a big-endian checkpoint")
    return entries


def read_tf_checkpoint(prefix: str | Path) -> dict[str, np.ndarray]:
    """All tensors of the checkpoint at ``prefix`` (e.g. ``.../124M/model.ckpt``)."""
    prefix = Path(prefix)
    index_path = prefix.with_name(prefix.name + ".index")
    if not index_path.is_file():
        raise FileNotFoundError(f"checkpoint index {index_path} does not exist")
    try:
        entries = _read_index(index_path)
    except (CheckpointFormatError, struct.error, IndexError) as err:
        raise CheckpointFormatError(
            f"{index_path} is not a readable TensorFlow checkpoint index ({err}); "
            "download the checkpoint again."
        ) from err
    shards: dict[int, bytes] = {}
    num_shards = 1 + max((e.shard_id for e in entries.values()), default=0)
    tensors: dict[str, np.ndarray] = {}
    for name, entry in entries.items():
        if entry.has_slices:
            raise CheckpointFormatError(f"{index_path}: tensor {name!r} is partitioned (sliced)")
        data_path = prefix.with_name(f"{prefix.name}.data-{entry.shard_id:05d}-of-{num_shards:05d}")
        if entry.shard_id not in shards:
            if not data_path.is_file():
                raise FileNotFoundError(
                    f"checkpoint data file {data_path} (for tensor {name!r}) does not exist"
                )
            shards[entry.shard_id] = data_path.read_bytes()
        blob = shards[entry.shard_id]
        if entry.offset + entry.size > len(blob):
            raise CheckpointFormatError(
                f"{data_path} is truncated: tensor {name!r} needs bytes up to "
                f"{entry.offset + entry.size:,} but the file has {len(blob):,}; "
                "download the checkpoint again."
            )
        raw = blob[entry.offset : entry.offset + entry.size]
        if entry.dtype == _DT_BFLOAT16:
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            array = bits.view(np.float32)
        elif entry.dtype in _DTYPES:
            array = np.frombuffer(raw, dtype=_DTYPES[entry.dtype])
        else:
            raise CheckpointFormatError(
                f"{index_path}: tensor {name!r} has unsupported dtype code {entry.dtype}"
            )
        expected = int(np.prod(entry.shape, dtype=np.int64))
        if array.size != expected:
            raise CheckpointFormatError(
                f"{index_path}: tensor {name!r} has {array.size} values for shape {entry.shape}"
            )
        tensors[name] = array.reshape(entry.shape)
    return tensors


def is_openai_folder(folder: Path) -> bool:
    """Whether ``folder`` looks like OpenAI's checkpoint (124M, 355M, 774M, 1558M)."""
    return (folder / "hparams.json").is_file() or any(folder.glob("*.ckpt.index"))


def read_openai_folder(folder: Path) -> tuple[dict[str, torch.Tensor], GPTConfig, str]:
    """The tensors of OpenAI's checkpoint folder under Hugging Face's names (``h.0.attn``
    for ``model/h0/attn``), its architecture, and the checkpoint's path."""
    hparams_path = folder / "hparams.json"
    try:
        hp = json.loads(hparams_path.read_text())
        cfg = GPTConfig(vocab_size=int(hp["n_vocab"]), context_length=int(hp["n_ctx"]),
                        emb_dim=int(hp["n_embd"]), n_layers=int(hp["n_layer"]),
                        n_heads=int(hp["n_head"]))  # fmt: skip
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{hparams_path} is missing; OpenAI's checkpoint folder (124M, 355M, 774M or "
            "1558M) ships it beside model.ckpt.index."
        ) from err
    except (ValueError, KeyError) as err:
        raise ValueError(f"{hparams_path} is not a valid GPT-2 hparams file: {err}") from err
    prefix = folder / "model.ckpt"
    checkpoint_file = folder / "checkpoint"
    if checkpoint_file.is_file():
        match = re.search(r'model_checkpoint_path:\s*"([^"]+)"', checkpoint_file.read_text())
        if match:
            prefix = folder / Path(match.group(1)).name
    state: dict[str, torch.Tensor] = {}
    for name, array in read_tf_checkpoint(prefix).items():
        key = name.removeprefix("model/")
        key = re.sub(r"^h(\d+)/", r"h.\1/", key).replace("/", ".")
        key = re.sub(r"\.(w|g)$", ".weight", key)
        key = re.sub(r"\.b$", ".bias", key)
        if key in ("wte", "wpe"):
            key += ".weight"
        tensor = torch.from_numpy(np.array(array))
        if tensor.ndim == 3 and tensor.shape[0] == 1:
            tensor = tensor[0]  # OpenAI's conv1d weights are (1, in, out)
        state[key] = tensor
    return state, cfg, str(prefix)
