"""The released key layout, and how it maps onto our state dict.

Our model keeps the routed experts stacked (`experts.gate_up_proj` [E, 2F, D], `experts.down_proj`
[E, D, F]) and the router's weights under `mlp.router.*`, so one grouped kernel can run all experts.
The release stores one gate/up/down matrix per expert and the router as `mlp.gate.weight` and
`mlp.router_scale`. This module is the only place that knows both: `release_layout` lists, for every
release tensor, which slice of which of our tensors it is; saving, loading and the conversion
helpers all walk that one list. `LoadPlan` checks a set of file keys against it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moge.checkpoint.build import add_expert_bias_where_saved, meta_model
from moge.checkpoint.files import Headers, listing
from moge.config import ModelConfig
from moge.errors import CheckpointError
from moge.nn.model import PanguProMoEForCausalLM

_STACKED = re.compile(r"^(model\.(?:layers|mtp)\.\d+\.mlp)\.(router\.gate\.weight|router\.router_scale|"
                      r"experts\.gate_up_proj|experts\.down_proj)$")
# Keys some exporters write that carry nothing the config does not already fix.
_IGNORABLE = re.compile(r"\.rotary_emb\.inv_freq$")
# Our own extra state: absent from the release, so a checkpoint may lack it (it keeps its init value).
_OPTIONAL = re.compile(r"\.mlp\.router\.expert_bias$")


@dataclass(frozen=True)
class TensorSlot:
    """One release tensor: `state_dict[key][index]` of our model (index () = the whole tensor)."""

    release_key: str
    key: str
    index: tuple = ()

    def of(self, tensors: Mapping[str, Tensor]) -> Tensor:
        return tensors[self.key][self.index]


def release_layout(state_dict: Mapping[str, Tensor], *, tie_word_embeddings: bool = False) -> list[TensorSlot]:
    """Every release tensor of a model with this state dict, in save order.

    Experts come out per expert (gate, up, down for expert 0, then expert 1, ...) at the place of
    the stacked tensors; keys the release shares with us (attention, norms, shared expert, our
    extra `router.expert_bias`) map to themselves. With tied embeddings `lm_head.weight` is left
    out, as Hugging Face does. Works on meta tensors (only shapes are read)."""
    slots: list[TensorSlot] = []
    for key, tensor in state_dict.items():
        if tie_word_embeddings and key == "lm_head.weight":
            continue
        m = _STACKED.match(key)
        if m is None:
            slots.append(TensorSlot(key, key))
            continue
        prefix, part = m.groups()
        if part == "router.gate.weight":
            slots.append(TensorSlot(f"{prefix}.gate.weight", key))
        elif part == "router.router_scale":
            slots.append(TensorSlot(f"{prefix}.router_scale", key))
        elif part == "experts.gate_up_proj":
            down_key = f"{prefix}.experts.down_proj"
            if down_key not in state_dict:
                raise KeyError(f"state dict has {key} but not {down_key}: the stacked experts need both")
            num_experts, two_f = tensor.shape[0], tensor.shape[1]
            f = two_f // 2
            for e in range(num_experts):
                base = f"{prefix}.experts.{e}"
                slots += [TensorSlot(f"{base}.gate_proj.weight", key, (e, slice(0, f))),
                          TensorSlot(f"{base}.up_proj.weight", key, (e, slice(f, two_f))),
                          TensorSlot(f"{base}.down_proj.weight", down_key, (e,))]
        # experts.down_proj was emitted together with gate_up_proj
    return slots


def release_state_dict(model: PanguProMoEForCausalLM) -> dict[str, Tensor]:
    """The model's weights under the release's key names and shapes (views, no copies)."""
    state = model.state_dict()
    layout = release_layout(state, tie_word_embeddings=model.config.tie_word_embeddings)
    return {slot.release_key: slot.of(state) for slot in layout}


def from_release_state_dict(tensors: Mapping[str, Tensor],
                            model_or_config: PanguProMoEForCausalLM | ModelConfig) -> dict[str, Tensor]:
    """Our state dict (stacked experts) from release-layout tensors, validated against the model.

    Each stacked tensor takes the dtype of its first piece. With tied embeddings the result has
    `lm_head.weight` as the same tensor as `model.embed_tokens.weight`. Given a config, routers whose
    `expert_bias` is among the tensors get the aux-loss-free bias, as in `load_pretrained`."""
    found = {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}
    if isinstance(model_or_config, ModelConfig):
        model = meta_model(model_or_config)
        add_expert_bias_where_saved(model, found)
    else:
        model = model_or_config
    plan = LoadPlan.of(model, found, where="the given tensors")
    out = plan.allocate(dtype=None, device="cpu")
    plan.fill(out, tensors.items())
    return out


@dataclass
class LoadPlan:
    """Which file tensor fills which slot of which model tensor, validated against the files."""

    state: dict[str, Tensor]  # the model's state dict (may be meta)
    slots: dict[str, TensorSlot]  # release key -> slot, for keys present in the files
    found: Headers
    tied: bool

    @classmethod
    def of(cls, model: nn.Module, found: Headers, where: str) -> LoadPlan:
        """Raises CheckpointError listing every missing, unexpected or misshapen key at once."""
        tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
        state = model.state_dict()
        layout = release_layout(state, tie_word_embeddings=tied)
        expected = {s.release_key: s for s in layout}
        problems: list[str] = []
        missing = [k for k in expected if k not in found and not _OPTIONAL.search(k)]
        if missing:
            problems.append(f"missing keys ({len(missing)}): {listing(missing)}")
        unexpected = [k for k in found if k not in expected and not _IGNORABLE.search(k)
                      and not (tied and k == "lm_head.weight")]
        if unexpected:
            hint = ""
            if any(_OPTIONAL.search(k) for k in unexpected):
                hint = " (router.expert_bias needs routers built with aux_free_bias=True)"
            problems.append(f"unexpected keys ({len(unexpected)}): {listing(unexpected)}{hint}")
        bad_shapes = []
        for key, slot in expected.items():
            if key in found:
                want, (shape, dtype) = tuple(slot.of(state).shape), found[key]
                if shape != want:
                    bad_shapes.append(f"{key}: expected shape {list(want)}, found {list(shape)}")
                elif dtype is None or not dtype.is_floating_point:
                    bad_shapes.append(f"{key}: expected a floating-point dtype, found {dtype}")
        if bad_shapes:
            problems.append(f"shape/dtype mismatches ({len(bad_shapes)}): {listing(bad_shapes, sep='; ')}")
        if problems:
            raise CheckpointError(f"checkpoint {where} does not match the model:\n  " + "\n  ".join(problems))
        return cls(state, {k: s for k, s in expected.items() if k in found}, found, tied)

    def allocate(self, dtype: torch.dtype | None, device: torch.device | str) -> dict[str, Tensor]:
        """Empty tensors for the whole state dict: `dtype` for floating tensors, else the dtype of
        the first file tensor that lands in each (optional tensors the files lack: their init value,
        zeros)."""
        first: dict[str, str] = {}
        for release_key, slot in self.slots.items():
            first.setdefault(slot.key, release_key)
        out: dict[str, Tensor] = {}
        for key, t in self.state.items():
            if self.tied and key == "lm_head.weight":
                continue
            if key not in first:  # optional, absent from the files
                out[key] = torch.zeros(t.shape, dtype=dtype or t.dtype, device=device)
                continue
            file_dtype = self.found[first[key]][1]
            out[key] = torch.empty(t.shape, dtype=dtype if dtype is not None else file_dtype, device=device)
        if self.tied:
            out["lm_head.weight"] = out["model.embed_tokens.weight"]
        return out

    def fill(self, tensors: Mapping[str, Tensor], source: Iterable[tuple[str, Tensor]]) -> None:
        """Copy each file tensor into its slot (converting dtype); keys outside the plan are skipped."""
        with torch.no_grad():
            for release_key, value in source:
                slot = self.slots.get(release_key)
                if slot is not None:
                    slot.of(tensors).copy_(value)
