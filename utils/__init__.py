"""Shared code of the book *Adversarial Robustness, Run and Measured*.

Modules, one per topic: :mod:`config`, :mod:`data`, :mod:`models`, :mod:`train`, :mod:`evaluate`,
:mod:`zoo`, :mod:`energy`, :mod:`attacks`, :mod:`plot`, :mod:`widgets`. Every chapter imports
from here, so the book and the library never disagree.
"""

__version__ = "0.1.0"
