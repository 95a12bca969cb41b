"""Public names imported on first use, so that importing a package costs nothing until a name is needed (the
command line checks its arguments before torch is imported)."""

import importlib
from collections.abc import Callable


def lazy_names(package: str, public: dict[str, str]) -> Callable[[str], object]:
    """A module `__getattr__` for `package`: each name in `public` comes from the submodule it maps to."""

    def __getattr__(name: str):
        if name not in public:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f".{public[name]}", package), name)

    return __getattr__
