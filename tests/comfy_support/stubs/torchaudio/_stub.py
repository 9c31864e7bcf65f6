"""Placeholders for the torchaudio stub: importable names that raise when used."""


class _Missing:
    """A torchaudio name that exists for imports and class bodies but cannot be used."""

    def __init__(self, name):
        self._name = name

    def __call__(self, *args, **kwargs):
        raise NotImplementedError(f"{self._name}: torchaudio is a test stub here (audio is not supported)")

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{self._name}.{attr}")

    def __repr__(self):
        return f"<torchaudio stub {self._name}>"


def getattr_for(module_name):
    def module_getattr(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Missing(f"{module_name}.{name}")

    return module_getattr


module_getattr = getattr_for("torchaudio")
