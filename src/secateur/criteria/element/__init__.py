"""Element criteria: one score per weight (magnitude, random, LAMP, Taylor, SNIP, GraSP, SynFlow).

Every module of this package registers its criteria on import, and the package imports them all: adding an
element criterion is one new file here.
"""

import importlib as _importlib
import pkgutil as _pkgutil

for _mod in _pkgutil.iter_modules(__path__):
    _importlib.import_module(f"{__name__}.{_mod.name}")
