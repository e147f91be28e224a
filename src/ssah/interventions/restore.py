"""Put an aligned model's weights back into a fine-tuned copy of it, one parameter group at a time.

`restored(attacked, layout, aligned, part)` is reversible (an `Intervention`): inside its `with` block
the entries of `part` hold the aligned model's values; on exit the attacked values come back, bit for
bit. A part is a union of terms joined by "+":

    SCU, UCU, CU, RU, all, SCU+CU:top=0.06, ...   units: the entries they own (a mask expression,
                                                  `ssah.interventions.expressions`; needs groups)
    embeddings                                    input embeddings and LM head (any embedding table)
    norms                                         every norm's scale and bias (q/k norms included)
    qk                                            what no unit owns inside attention: q and k rows, v rows
                                                  shared under grouped-query attention, shared biases
    other                                         what no unit owns anywhere else (e.g. the MLP's output bias)

What no unit owns is `outside_slices` of every unit, the definition freezing uses too; the four
non-unit parts split it by where each parameter lives, so SCU, UCU, CU, RU and the four non-unit
parts together cover every parameter entry exactly once.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ssah.errors import SsahError
from ssah.interventions.base import Intervention, short_digest
from ssah.interventions.expressions import NON_UNIT_PARTS, parse_part
from ssah.interventions.masks import UnitMask, layout_mask, mask_from_expression, outside_slices
from ssah.models.fingerprint import model_fingerprint, sample_bytes
from ssah.units.layout import UnitLayout

# parameter name -> None (the whole parameter) or (axis, sorted positions along it)
Selection = dict[str, "tuple[int, torch.Tensor] | None"]


def part_selection(model: nn.Module, layout: UnitLayout, part: str | UnitMask, groups=None) -> Selection:
    """The entries a part names (see the module docstring): unit terms through `groups` (saved
    `Groups`), non-unit parts from the model's modules."""
    if isinstance(part, UnitMask):
        return _unit_selection(part, layout)
    units, extras = parse_part(part)
    selection: Selection = {}
    if units is not None:
        if groups is None:
            raise SsahError(f"part {part!r} names units; give the groups they come from")
        selection = _unit_selection(mask_from_expression(groups, units), layout)
    if extras:
        kinds = non_unit_parts(model, layout)
        for extra in extras:
            selection = _merge(selection, kinds[extra])
    return selection


def non_unit_parts(model: nn.Module, layout: UnitLayout) -> dict[str, Selection]:
    """The entries no unit owns, split into the non-unit parts by the module each parameter is in."""
    whole, partial = outside_slices(layout_mask(layout, True, "all"), layout)
    found: dict[str, Selection] = {name: {} for name in NON_UNIT_PARTS}
    where = _parameter_places(model, layout)
    for name in whole:
        found[where.get(name, "other")][name] = None
    for (name, dim), positions in partial.items():
        if positions.numel():
            found[where.get(name, "other")][name] = (dim, positions)
    return found


def _parameter_places(model: nn.Module, layout: UnitLayout) -> dict[str, str]:
    """Parameter name -> embeddings, norms or qk, for those that sit in such a module (else other)."""
    from ssah.models.adapters import adapter_for

    adapter = adapter_for(layout.model_type)
    attention = {f"{adapter.layers}.{i}.{adapter.attn_out.rpartition('.')[0]}." for i in range(layout.num_layers)}
    tables = {id(m) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    places = {}
    for module_name, module in model.named_modules():
        if id(module) in tables or isinstance(module, nn.Embedding):
            place = "embeddings"
        elif "norm" in type(module).__name__.lower():
            place = "norms"
        elif any(f"{module_name}.".startswith(prefix) for prefix in attention):
            place = "qk"
        else:
            continue
        for param_name, _ in module.named_parameters(prefix=module_name, recurse=False):
            places[param_name] = place
    return places


def _unit_selection(mask: UnitMask, layout: UnitLayout) -> Selection:
    selection: Selection = {}
    for (name, dim), positions in mask.owned_slices(layout).items():
        selection = _merge(selection, {name: (dim, positions)})
    return selection


def _merge(first: Selection, second: Selection) -> Selection:
    """The union of two selections (a parameter selected whole in either stays whole)."""
    merged = dict(first)
    for name, picked in second.items():
        if name in merged and (merged[name] is None or picked is None):
            merged[name] = None
            continue
        if name in merged:
            (dim, positions), (other_dim, others) = merged[name], picked
            if dim != other_dim:
                raise SsahError(f"{name} is selected along two axes; a part must select it along one")
            picked = (dim, torch.cat([positions, others]).unique(sorted=True))
        merged[name] = picked
    return merged


def selection_entries(selection: Selection, layout: UnitLayout) -> int:
    """How many parameter entries a selection holds."""
    total = 0
    for name, picked in selection.items():
        shape = layout.param_shapes[name]
        size = int(torch.Size(shape).numel())
        total += size if picked is None else picked[1].numel() * size // shape[picked[0]]
    return total


class Restoring(Intervention):
    """The aligned values of a part's entries in the attacked model while the `with` block runs; the
    attacked values come back on exit. Only the selected entries are copied (both ways)."""

    kind = "restored"

    def __init__(self, model: nn.Module, layout: UnitLayout, aligned: nn.Module | Mapping[str, torch.Tensor],
                 part: str | UnitMask, groups=None):
        self.model, self.layout = model, layout
        self.aligned = aligned_tensors(aligned, layout)
        self.part = part.expression if isinstance(part, UnitMask) else part
        self.selection = part_selection(model, layout, part, groups)
        self.aligned_id = model_fingerprint(aligned) if isinstance(aligned, nn.Module) else _state_digest(aligned)
        made_on = part.model_fingerprint if isinstance(part, UnitMask) else getattr(groups, "model_fingerprint", None)
        if made_on and isinstance(aligned, nn.Module) and made_on not in (self.aligned_id, model_fingerprint(model)):
            raise SsahError(f"the groups were made for model {made_on}, neither the aligned model ({self.aligned_id}) "
                            "nor the attacked one; give the groups of the aligned model")
        self.key = f"restored-{short_digest(self.aligned_id, *_selection_bytes(self.selection))}"
        self._saved: dict | None = None

    @torch.no_grad()
    def apply(self) -> None:
        params = dict(self.model.named_parameters())
        self._saved = {}
        for name, picked in self.selection.items():
            param, source = params[name], self.aligned[name]
            if picked is None:
                self._saved[name] = param.detach().clone()
                param.copy_(source.to(param.device, param.dtype))
                continue
            dim, positions = picked
            here = positions.to(param.device)
            self._saved[name] = param.detach().index_select(dim, here).clone()
            values = source.index_select(dim, positions.to(source.device)).to(param.device, param.dtype)
            param.index_copy_(dim, here, values)

    @torch.no_grad()
    def undo(self) -> None:
        if self._saved is None:
            return
        params = dict(self.model.named_parameters())
        for name, values in self._saved.items():
            picked = self.selection[name]
            if picked is None:
                params[name].copy_(values)
            else:
                params[name].index_copy_(picked[0], picked[1].to(values.device), values)
        self._saved = None

    def entries(self) -> int:
        return selection_entries(self.selection, self.layout)

    def report_block(self, rows: list[dict]) -> dict:
        total = sum(int(torch.Size(s).numel()) for s in self.layout.param_shapes.values())
        return {"part": self.part, "aligned": self.aligned_id, "entries": self.entries(),
                "share_of_entries": self.entries() / max(1, total)}


def restored(model: nn.Module, layout: UnitLayout, aligned: nn.Module | Mapping[str, torch.Tensor],
             part: str | UnitMask, groups=None) -> Restoring:
    """Within `with restored(...)` the part's entries of `model` hold `aligned`'s values (a model or
    its state dict, same layout); on exit the model's own values come back."""
    return Restoring(model, layout, aligned, part, groups)


def aligned_tensors(aligned, layout: UnitLayout) -> Mapping[str, torch.Tensor]:
    """The aligned model's parameters by name, refused unless every one matches the layout's shape."""
    tensors = dict(aligned.named_parameters()) if isinstance(aligned, nn.Module) else aligned
    for name, shape in layout.param_shapes.items():
        found = tensors.get(name)
        if found is None or tuple(found.shape) != tuple(shape):
            have = "missing" if found is None else tuple(found.shape)
            raise SsahError(f"the aligned and attacked models differ at {name} ({have} vs {tuple(shape)}); "
                            "restoring needs two versions of one model (same layout)")
    return {name: tensors[name].detach() for name in layout.param_shapes}


def _state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """Names, shapes and evenly spaced samples of a state dict's tensors (as `model_fingerprint`)."""
    parts = []
    for name in sorted(state):
        parts += [f"{name}:{tuple(state[name].shape)};", sample_bytes(state[name])]
    return short_digest(*parts)


def _selection_bytes(selection: Selection) -> list[bytes | str]:
    parts: list[bytes | str] = []
    for name in sorted(selection):
        picked = selection[name]
        parts.append(f"{name}:{'all' if picked is None else picked[0]};")
        if picked is not None:
            parts.append(picked[1].to(torch.int64).numpy().tobytes())
    return parts
