"""What every recipe section shares: frozen, strict pydantic models, and cross-field errors that name their keys."""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError


def conflict(keys: tuple[str, ...], message: str) -> PydanticCustomError:
    """A cross-field error that names its keys (relative to the section), so the recipe loader can point at
    the line of each one instead of at the section."""
    return PydanticCustomError("conflict", message, {"keys": keys})


class _Spec(BaseModel):
    # Frozen so a recipe cannot drift after validation; extra="forbid" so typos are errors; no inf/nan (`lr: .inf`
    # would pass gt=0 and train on NaN).
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(), allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_and_booleans_as_written(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads `r: true` as 1 and `packing: 1` as true; YAML's yes/no/on/off make the first an
        # easy slip, and neither is what was meant.
        annotation = cls.model_fields[info.field_name].annotation
        kinds = set(typing.get_args(annotation) or (annotation,))
        if annotation is bool and not isinstance(value, bool):
            raise ValueError("expected true or false")
        if isinstance(value, bool) and kinds & {int, float} and bool not in kinds:
            raise ValueError("expected a number, not a boolean (YAML reads true/false/yes/no/on/off as booleans)")
        return value
