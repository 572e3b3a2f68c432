"""How one state field is stored: its format (as torchao's optimizer states are tensor subclasses of
one math). A format turns a field name into the page fields that hold it, and loads the field as
float32 values / stores float32 values back. An algorithm's math is written once over formats, so a
narrower format (4-bit, fp8) is a new format, not a new algorithm.

- `Dense(dtype)`: the values themselves, in `dtype` (the parameter's, or float32).
- `Blockwise8bit(signed)`: one uint8 code per element of the bitsandbytes dynamic map and one float32
  absmax per 256-element block, quantized as torchao quantizes (stated_kernels.quant_maps). Its page
  fields are `<name>` (the codes) and `<name>_scale`: torchao's `codes` and `scale`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from stated_kernels import quant_maps
from stated_kernels.spec import FieldSpec

Views = Mapping[str, torch.Tensor]


class FieldFormat:
    """Base of the formats: `fields`, `load` and `store` are what an algorithm's math uses."""

    quantized = False

    def fields(self, name: str) -> tuple[FieldSpec, ...]:
        raise NotImplementedError

    def nbytes(self, elements: int) -> int:
        """Bytes the field takes for a tensor of `elements` elements."""
        return sum(f.nbytes(elements) for f in self.fields(""))


@dataclasses.dataclass(frozen=True)
class Dense(FieldFormat):
    """A field stored as its values, in `dtype`."""

    dtype: torch.dtype

    def fields(self, name: str) -> tuple[FieldSpec, ...]:
        return (FieldSpec(name, self.dtype),)

    def load(self, views: Views, name: str) -> torch.Tensor:
        """The field's values of one segment as float32 (a new tensor unless already float32)."""
        return views[name].float()

    def store(self, views: Views, name: str, value: torch.Tensor) -> None:
        views[name].copy_(value)


@dataclasses.dataclass(frozen=True)
class Blockwise8bit(FieldFormat):
    """8-bit codes of a dynamic map, one float32 absmax per `block` elements (ALGORITHMS.md 3.1, 3.3)."""

    signed: bool
    block: int = quant_maps.BLOCK
    quantized = True

    def fields(self, name: str) -> tuple[FieldSpec, ...]:
        return (FieldSpec(name, torch.uint8), FieldSpec(name + "_scale", torch.float32, per=self.block))

    def qmap(self) -> torch.Tensor:
        """The 256 float32 values a code stands for."""
        return quant_maps.dynamic_map(self.signed)

    def load(self, views: Views, name: str) -> torch.Tensor:
        return quant_maps.dequantize(views[name], views[name + "_scale"], self.signed)

    def store(self, views: Views, name: str, value: torch.Tensor) -> None:
        quant_maps.quantize(value, self.signed, views[name], views[name + "_scale"])

    # --- state_dict entries (flat codes and scales <-> float values of any shape) ----------------

    def decode(self, entry: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
        """The float32 values of `entry[name]` (codes, with `entry[name + "_scale"]`), in its shape."""
        codes = entry[name]
        flat = quant_maps.dequantize(codes.reshape(-1), entry[name + "_scale"].reshape(-1), self.signed)
        return flat.view(codes.shape)

    def encode(self, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes (in `value`'s shape) and scales of float values, as torchao quantizes a float copy."""
        codes = torch.empty(value.shape, dtype=torch.uint8)
        scale = torch.empty(value.numel() // self.block, dtype=torch.float32)
        quant_maps.quantize(value.detach().reshape(-1).float().contiguous(), self.signed, codes.view(-1), scale)
        return codes, scale


def page_fields(formats: Mapping[str, FieldFormat]) -> tuple[FieldSpec, ...]:
    """The page fields of named state fields in their formats: the elementwise fields first, then
    the per-block ones, each in the order given (so that codes of several moments lie together)."""
    fields = [f for name, fmt in formats.items() for f in fmt.fields(name)]
    return tuple(sorted(fields, key=lambda f: f.per))
