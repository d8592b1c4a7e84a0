"""What every config section shares: strict frozen models, the one-line error, the limits."""
from __future__ import annotations

import math
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


class ConfigError(ValueError):
    """A bad configuration value; ``str(err)`` is one line naming the key."""


INT_LIMIT = 2**31 - 1  # no count, size or seed here is meant to be larger; beyond it C++ overflows


class _Section(BaseModel):
    # strict: no silent coercion ("3" is not 3, 1.5 is not 1); inf and nan are never a setting
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, use_attribute_docstrings=True,
                              allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _whole_floats_are_ints(cls, value: Any, info: ValidationInfo) -> Any:
        """``1E6`` or ``2.0`` for an int field is the int a user means (an integral float only)."""
        field = cls.model_fields[info.field_name]
        if field.annotation in (int, Optional[int], "int", "Optional[int]") and isinstance(value, float) \
                and math.isfinite(value) and value.is_integer() and abs(value) <= INT_LIMIT:
            return int(value)
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _no_absurd_ints(cls, value: Any) -> Any:
        items = value if isinstance(value, list) else [value]
        for v in items:
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > INT_LIMIT:
                raise ValueError(f"{v} is out of range (at most {INT_LIMIT} in size)")
        return value


class _FieldError(ValueError):
    """Raised inside validators; its key (relative to the section) goes into the one-line error."""

    def __init__(self, key: str, msg: str) -> None:
        super().__init__(f"{key}: {msg}")
        self.key, self.msg = key, msg
