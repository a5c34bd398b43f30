"""Import the modules of Detectron2 and fvcore that call ``torch.jit.script`` at import time.

``fvcore.nn.focal_loss`` and ``detectron2.modeling.box_regression`` script functions when
imported, and recent torch answers each with "FutureWarning: `torch.jit.script` is
deprecated" (printed twice by every command, even ``--help``). This module imports them once
with only that warning, from only ``torch.jit``, silenced; later ``torch.jit.script`` calls
still warn. ``queryinst/__init__.py`` imports it first, and the entry points import
``queryinst`` before Detectron2.
"""
import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                            category=FutureWarning, module=r"torch\.jit\._script")
    import fvcore.nn  # noqa: F401
    import detectron2.modeling.box_regression  # noqa: F401
