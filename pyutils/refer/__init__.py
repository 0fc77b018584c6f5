"""The REFER API of lichengunc/refer for RefCOCO, RefCOCO+, RefCOCOg and RefCLEF."""

from .refer import REFER, AnnotationError, load_instances, load_refs

__all__ = ["REFER", "AnnotationError", "load_instances", "load_refs"]
