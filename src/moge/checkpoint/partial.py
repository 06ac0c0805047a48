"""Reading one rank's share of a checkpoint, and nothing else.

A parallel plan (moge.parallel.parallelize) describes every local tensor as it slices it: a
`GlobalSlice` says which pieces of which single-process tensor the local one holds (an expert range
along dim 0; a row or column range for tensor parallelism; for `gate_up_proj` under expert TP two
row ranges, gate's and up's, concatenated). `PartialSource` fills local tensors from those records,
reading straight from the safetensors shards with `safe_open(...).get_slice(key)[index]`, one file
at a time: our stacked expert tensors map to the release's per-expert keys through
`release_layout`, so a rank with 1/ep of the experts reads only its experts' matrices, and a tensor
the rank does not host is never materialised. A W8A8 checkpoint (moge.checkpoint.quantized) keeps
our own names and stacked layout, so each of its keys maps to itself: a rank reads its experts'
rows of the int8 weights and of their scales; int8 weights, scales and biases keep their file
dtype (only the unquantized float tensors follow `dtype`) and every value read is checked like the
whole loader checks it. Pickle checkpoints cannot be read in slices and are refused with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from moge.checkpoint.build import add_expert_bias_where_saved, meta_model
from moge.checkpoint.files import Source, corrupt_file_error, listing, read_config
from moge.checkpoint.layout import LoadPlan, TensorSlot
from moge.checkpoint.quantized import QuantizedCheckpoint, check_quantized_values
from moge.config import ModelConfig
from moge.errors import CheckpointError
from moge.nn.model import PanguProMoEForCausalLM

Index = tuple[slice, ...]
MAPPED_BYTES = 4 << 20  # bytes of a file read through one mapping before it is reopened


@dataclass(frozen=True)
class GlobalSlice:
    """A local tensor = `pieces` of the single-process tensor `key` (each an index of slices into
    it), concatenated along `dim`. `((),)` is the whole tensor; no pieces at all means zeros (a
    bias only one rank of a tensor-parallel group adds)."""

    key: str
    pieces: tuple[Index, ...] = ((),)
    dim: int = 0

    def take(self, full: Tensor) -> Tensor:
        """This slice of `full` (a view for one piece; works on meta tensors)."""
        if not self.pieces:
            return torch.zeros_like(full)
        parts = [full[piece] for piece in self.pieces]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.dim)


def _ranges(index: Sequence, shape: Sequence[int]) -> list[tuple[int, int]]:
    """[start, stop) per dimension of `shape` selected by `index` (slices of step 1, or ints)."""
    out = []
    for d, size in enumerate(shape):
        ix = index[d] if d < len(index) else slice(None)
        if isinstance(ix, int):
            out.append((ix, ix + 1))
            continue
        start, stop, step = ix.indices(size)
        if step != 1:
            raise ValueError(f"index {index!r}: only contiguous slices can be read from a checkpoint")
        out.append((start, stop))
    return out


def _span(index: Index, shape: Sequence[int]) -> int:
    """Elements from the first to the last one `index` selects in a row-major tensor of `shape`:
    the part of the file a slice read touches."""
    if not shape:
        return 1
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    ranges = _ranges(index, shape)
    if any(lo >= hi for lo, hi in ranges):
        return 0
    return sum((hi - 1 - lo) * st for (lo, hi), st in zip(ranges, strides, strict=True)) + 1


@dataclass
class PartialSource:
    """A safetensors checkpoint (float, or W8A8 when `quantized` is set), validated against its
    config, ready to fill a rank's tensors."""

    directory: Path
    config: ModelConfig
    source: Source
    plan: LoadPlan  # of the whole (meta) model: release keys -> slots of our state dict
    slots_of: dict[str, list[TensorSlot]]  # our key -> the release tensors it is made of
    file_of: dict[str, str]  # release key -> shard file
    quantized: QuantizedCheckpoint | None = None

    @classmethod
    def open(cls, directory: str | Path) -> PartialSource:
        directory = Path(directory)
        cfg = read_config(directory)
        if "quantization_config" in cfg.extra:
            return cls._open_quantized(directory)
        source = Source.open(directory, allow_pickle=True)
        if source.pickle:
            raise CheckpointError(f"{directory} has pickle weight files: sharded loading reads slices of "
                                  f"safetensors files only (a pickle must be unpickled whole); convert it with "
                                  f"save_pretrained(load_pretrained(dir, allow_pickle=True), new_dir)")
        model = meta_model(cfg)
        add_expert_bias_where_saved(model, source.found)
        plan = LoadPlan.of(model, source.found, where=str(directory))
        slots_of: dict[str, list[TensorSlot]] = {}
        for slot in plan.slots.values():
            slots_of.setdefault(slot.key, []).append(slot)
        file_of = {key: name for name, keys in source.files.items() for key in keys}
        return cls(directory, cfg, source, plan, slots_of, file_of)

    @classmethod
    def _open_quantized(cls, directory: Path) -> PartialSource:
        """A W8A8 checkpoint: one file holding our state dict under its own names, so every key is
        one slot of itself (the whole tensor)."""
        ckpt = QuantizedCheckpoint.open(directory)
        model = ckpt.meta_model()
        state = model.state_dict()
        slots = {key: TensorSlot(key, key) for key in ckpt.expected(model)}
        plan = LoadPlan(state, slots, ckpt.found, ckpt.config.tie_word_embeddings)
        source = Source(directory, {ckpt.path.name: list(ckpt.found)}, ckpt.found)
        return cls(directory, ckpt.config, source, plan, {key: [slot] for key, slot in slots.items()},
                   {key: ckpt.path.name for key in ckpt.found}, ckpt)

    def meta_model(self) -> PanguProMoEForCausalLM:
        """A fresh whole model these files fill, on the meta device (quantized modules where the
        checkpoint has them; an aux-loss-free router wherever a bias is saved): apply a plan to it,
        then `allocate` and `fill` its local tensors."""
        if self.quantized is not None:
            return self.quantized.meta_model()
        model = meta_model(self.config)
        add_expert_bias_where_saved(model, self.source.found)
        return model

    def global_shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.plan.state[key].shape)

    def allocate(self, local: Mapping[str, Tensor], slices: Mapping[str, GlobalSlice],
                 dtype: torch.dtype | None, device: torch.device | str) -> dict[str, Tensor]:
        """Empty tensors shaped like `local` (e.g. a parallelized meta model's state dict) in `dtype`,
        or, for None, the files' dtype of each one's first release tensor; the tensors of quantized
        modules always keep the files' dtype (int8, fp32); optional tensors the files lack
        (router.expert_bias) and zero slices are zeros. Then `fill` them."""
        self._check(local, slices)
        out: dict[str, Tensor] = {}
        for name, t in local.items():
            if self._tied_alias(name):
                continue
            rec = slices[name]
            slots = self.slots_of.get(rec.key)
            file_dtype = self.source.found[slots[0].release_key][1] if slots else t.dtype
            fixed = self.quantized is not None and rec.key in self.quantized.quant_keys
            want = dtype if dtype is not None and t.is_floating_point() and not fixed else file_dtype
            make = torch.zeros if not slots or not rec.pieces else torch.empty
            out[name] = make(t.shape, dtype=want, device=device)
        if self.plan.tied and "lm_head.weight" in local:
            out["lm_head.weight"] = out["model.embed_tokens.weight"]
        return out

    def fill(self, tensors: Mapping[str, Tensor], slices: Mapping[str, GlobalSlice]) -> None:
        """Copy into each tensor (any dtype or device: converted while copied) the part of the
        checkpoint its GlobalSlice names, reading only those bytes, file by file. Tensors whose
        release keys the files lack (optional ones) keep their values."""
        self._check(tensors, slices)
        reads: dict[str, list[tuple[str, Index, Tensor]]] = {}
        with torch.no_grad():
            for name, dst in tensors.items():
                if self._tied_alias(name):
                    continue
                rec = slices[name]
                if not rec.pieces:
                    dst.zero_()
                    continue
                for key, src, view in self._reads(name, rec, dst):
                    reads.setdefault(self.file_of[key], []).append((key, src, view))
            for file_name in sorted(reads):
                self._read_file(self.directory / file_name, reads[file_name])

    # ---- internals -------------------------------------------------------------------------------
    def _tied_alias(self, name: str) -> bool:
        return self.plan.tied and name == "lm_head.weight"

    def _check(self, local: Mapping[str, Tensor], slices: Mapping[str, GlobalSlice]) -> None:
        unknown = [n for n in local if n not in slices]
        if unknown:
            raise CheckpointError(f"no record of which part of the checkpoint these tensors hold: {listing(unknown)} "
                                  f"(parallelize the model with moge.parallel.parallelize first)")
        foreign = sorted({slices[n].key for n in local if slices[n].key not in self.plan.state})
        if foreign:
            raise CheckpointError(f"checkpoint {self.directory} has no tensors {listing(foreign)} that the model's "
                                  f"shards come from")

    def _reads(self, name: str, rec: GlobalSlice, dst: Tensor) -> list[tuple[str, Index, Tensor]]:
        """(release key, index into that release tensor, destination view) for every release tensor
        that overlaps one of the record's pieces."""
        shape = self.global_shape(rec.key)
        out = []
        offset = 0
        for piece in rec.pieces:
            want = _ranges(piece, shape)
            extent = want[rec.dim][1] - want[rec.dim][0]
            view = dst.narrow(rec.dim, offset, extent) if len(rec.pieces) > 1 else dst
            offset += extent
            if list(view.shape) != [hi - lo for lo, hi in want]:
                raise CheckpointError(f"{name}: the model holds shape {list(view.shape)} where its record asks for "
                                      f"{[hi - lo for lo, hi in want]} of {rec.key} {list(shape)}")
            for slot in self.slots_of.get(rec.key, []):
                have = _ranges(slot.index, shape)
                both = [(max(a, b), min(c, d)) for (a, c), (b, d) in zip(have, want, strict=True)]
                if any(lo >= hi for lo, hi in both):
                    continue
                # the slot's int indices drop that dimension in the release tensor
                src = tuple(slice(lo - h0, hi - h0) for (lo, hi), (h0, _), ix in
                            zip(both, have, [*slot.index, *[slice(None)] * len(shape)], strict=False)
                            if not isinstance(ix, int))
                dst_ix = tuple(slice(lo - w0, hi - w0) for (lo, hi), (w0, _) in zip(both, want, strict=True))
                out.append((slot.release_key, src, view[dst_ix]))
        return out

    def _read_file(self, path: Path, reads: list[tuple[str, Index, Tensor]]) -> None:
        """Copy every read into its destination. safetensors maps the file into memory, and each page
        read stays in the process's resident set until the file is closed: it is reopened whenever
        `MAPPED_BYTES` of it have been touched, so a rank peaks at its own tensors plus that much, not
        at twice its share (measured, EP rank 0 of 2 holding 56 MB of a 106 MB W8A8 file: a peak of
        128 MB read through one mapping, 64 MB with this)."""
        done = 0
        while done < len(reads):
            done = self._read_some(path, reads, done)

    def _read_some(self, path: Path, reads: list[tuple[str, Index, Tensor]], first: int) -> int:
        """Reads from `first` on through one open handle, until MAPPED_BYTES are touched; the next index."""
        try:
            handle = safe_open(path, framework="pt", device="cpu")
        except Exception as e:  # noqa: BLE001 - the Rust errors have no stable Python type
            raise corrupt_file_error(path, e) from None
        touched = 0
        with handle as f:
            for i in range(first, len(reads)):
                if touched >= MAPPED_BYTES:
                    return i
                key, src, dst = reads[i]
                shape = self.source.found[key][0]
                try:
                    whole = all(s == slice(0, n) for s, n in zip(src, shape, strict=True))
                    value = f.get_tensor(key) if whole else f.get_slice(key)[src]
                except Exception as e:  # noqa: BLE001
                    raise corrupt_file_error(path, e) from None
                if self.quantized is not None and key in self.quantized.quant_keys:
                    check_quantized_values(key, value, path, signed_scales=self.quantized.scheme.signed_scales)
                dst.copy_(value.reshape(dst.shape))
                touched += _span(src, shape) * value.element_size()
                del value
        return len(reads)
