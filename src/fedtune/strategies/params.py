"""The ranges of strategy parameters, as types: `registry.check_named` validates a strategy's
parameters with pydantic (`TypeAdapter` over its dataclass), which reads these bounds, so
`fedtune validate` refuses an out-of-range value by field name before any training (a negative
clip used to flip every update's sign; a delta of 5 reported an epsilon at a meaningless delta)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Probability = Annotated[float, Field(ge=0, le=1)]  # [0, 1]
OpenUnit = Annotated[float, Field(gt=0, lt=1)]  # (0, 1): a DP delta, a quantile
Decay = Annotated[float, Field(ge=0, lt=1)]  # [0, 1): a moment's decay
Count = Annotated[int, Field(ge=1)]
NonNegativeCount = Annotated[int, Field(ge=0)]
