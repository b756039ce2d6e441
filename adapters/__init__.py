"""Built-in adapters, one module per mlx-lm family that differs from the common shape.

Importing this package registers them all. Families with the common shape
(``Model.model`` backbone, ``lm_head`` or tied embedding, nothing after it)
need no module here.
"""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
