"""The KV cache of a transformers model across versions.

transformers 5.2x renamed the forward's `past_key_values` argument and output field to `cache`; the
old names still work there with a warning and go in 5.40, while 4.x knows only the old ones. These two
helpers use whichever the installed model understands.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any


@functools.cache
def _keyword(model_class: type) -> str:
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """{keyword: cache} for `model(...)`: `cache` where the model's forward takes it, else `past_key_values`."""
    return {_keyword(type(model)): cache}


def output_cache(output: Any) -> Any:
    """The KV cache a forward with use_cache=True returned (`output.cache`, or `output.past_key_values`)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
