"""The REFER API of lichengunc/refer for RefCOCO, RefCOCO+, RefCOCOg and RefCLEF."""

from .refer import REFER

__all__ = ["REFER"]
