"""Choices a program makes once for many fused ops (the backend, the memory policy): each comes from, in order,
the call's own argument, the innermost ``with`` block that sets it, an environment variable, and a default."""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator


class Setting:
    """One such choice: `what` names it in errors ("backend"), `choices` are its values."""

    def __init__(self, what: str, choices: tuple[str, ...], env_var: str, default: str) -> None:
        self.what, self.choices, self.env_var, self.default = what, choices, env_var, default
        self._current: contextvars.ContextVar[str | None] = contextvars.ContextVar(f"fused_resnet_{what}",
                                                                                  default=None)

    def check(self, value: object, where: str) -> str:
        """`value` if it is one of the choices, else a ValueError naming `where` it came from."""
        if value not in self.choices:
            raise ValueError(f"{where}: unknown {self.what} {value!r}; expected one of {', '.join(self.choices)}")
        return value  # type: ignore[return-value]

    @contextlib.contextmanager
    def use(self, value: str, where: str) -> Iterator[None]:
        """Sets the choice inside the ``with`` block (for calls that are not given one)."""
        token = self._current.set(self.check(value, where))
        try:
            yield
        finally:
            self._current.reset(token)

    def requested(self, value: str | None = None, where: str | None = None) -> str:
        """The choice: `value` when given (checked, errors naming `where`), else the context's, the environment's
        or the default."""
        if value is not None:
            return self.check(value, where or f"{self.what} argument")
        current = self._current.get()
        if current is not None:
            return current
        env = os.environ.get(self.env_var)
        if env:
            return self.check(env, f"environment variable {self.env_var}")
        return self.default
