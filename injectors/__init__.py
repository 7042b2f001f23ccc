"""Deterministic fault injection for Hugging Face causal LMs.

Describe a fault with :class:`FaultSpec`, resolve it with a seed into concrete :class:`Fault`
records (:func:`resolve_faults`), and arm them on a model with :class:`Injector`.
"""

from injectors.bits import FloatFormat, field_bits, flip_bits, format_of, set_value, stuck_at
from injectors.injector import FiredFault, InjectionHandle, Injector
from injectors.resolve import resolve_faults
from injectors.sites import ROLES, Site, list_sites, select_sites
from injectors.spec import CorruptionSpec, Fault, FaultSpec, SiteSpec, TimeSpec

__all__ = [
    "CorruptionSpec",
    "Fault",
    "FaultSpec",
    "FiredFault",
    "FloatFormat",
    "InjectionHandle",
    "Injector",
    "ROLES",
    "Site",
    "SiteSpec",
    "TimeSpec",
    "field_bits",
    "flip_bits",
    "format_of",
    "list_sites",
    "resolve_faults",
    "select_sites",
    "set_value",
    "stuck_at",
]
