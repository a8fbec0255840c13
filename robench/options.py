"""The ``-o NAME.PARAM=VALUE`` value check shared by attacks (``robench eval``) and defenses
(``robench train``): one rule for which value types a parameter accepts."""

from __future__ import annotations

from typing import Any

from robench.errors import UserError


def check_option_types(name: str, reference: object, overrides: dict[str, Any]) -> None:
    """A numeric or boolean parameter given as another type (``-o pgd.attack_steps=abc``) is a
    UserError here rather than a TypeError deep inside the attack or defense. ``reference``: the
    plugin built with its defaults, whose values say each parameter's type."""
    for param, value in overrides.items():
        default = getattr(reference, param, None)
        if value is None or default is None:
            continue
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            ok = ok and (isinstance(value, int) or isinstance(default, float))
        else:
            continue
        if not ok:
            raise UserError(f"-o {name}.{param}={value!r}: expected {type(default).__name__}, "
                            f"e.g. -o {name}.{param}={default!r}".replace("True", "true").replace("False", "false"))
