"""vramcal from Python: the same estimator as ``vramcal estimate --json``.

    >>> import vramcal
    >>> e = vramcal.estimate(model="mistral-7b-v0.1", method="lora",
    ...                      lora="r=16,alpha=32,targets=all-linear", batch=4, seq=1024,
    ...                      dtype="bf16", gpu="a100-80gb")
    >>> e["estimate"]["peak_bytes"]

Keyword arguments are the command's options with ``_`` for ``-`` (``state_dtype`` is
``--optimizer-state-dtype``'s own name: ``optimizer_state_dtype``); ``True`` passes a flag,
``None`` and ``False`` leave the option out, lists and tuples are joined with commas (for
``measured``, the option that takes several files, they are its several values). The result
is the dict the command prints with ``--json``; a refused configuration raises ``ValueError``
with the command's one-line message.
"""

import json as _json

from ._vramcal import __version__, estimate_json as _estimate_json

__all__ = ["estimate", "estimate_args", "MemoryRecorder", "LoopRecorder", "LightningRecorder",
           "__version__"]

# Options that take several values (`--measured A.csv B.csv`).
_MANY = {"measured"}


def __getattr__(name):
    # transformers is imported only by those who use the callback.
    if name in ("MemoryRecorder", "LoopRecorder"):
        from . import recorder

        return getattr(recorder, name)
    # lightning likewise.
    if name == "LightningRecorder":
        from .lightning_recorder import LightningRecorder

        return LightningRecorder
    raise AttributeError(name)


def estimate_args(**options):
    """The command-line arguments (after ``estimate``) that ``estimate(**options)`` runs."""
    args = []
    for key, value in options.items():
        if value is None or value is False or (key in _MANY and value == []):
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif isinstance(value, (list, tuple)) and key in _MANY:
            args += [flag, *(str(v) for v in value)]
        elif isinstance(value, (list, tuple)):
            args += [flag, ",".join(str(v) for v in value)]
        else:
            args += [flag, str(value)]
    return args


def estimate(**options):
    """vramcal's itemized estimate of one fine-tuning configuration, as a dict (the JSON of
    ``vramcal estimate --json``; bytes in ``*_bytes`` keys).

    Raises ``ValueError`` for what the command refuses (an unknown model, option or value).
    """
    if "json" in options:
        raise ValueError("estimate() always answers in JSON: leave out json=")
    return _json.loads(_estimate_json(estimate_args(**options)))
