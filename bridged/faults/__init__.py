"""Fault injection for load and fault testing (``[faults]``, ``bridged fault``).

`catalog` lists every fault kind and its keys; `spec` checks configured and
on-demand faults; `plan` draws them, seeded and reproducible, in the process
that injects them.
"""

from bridged.faults.catalog import CATALOG, Area, FaultKind, Param, Per, Where, kind
from bridged.faults.plan import FaultPlan, Hit, Report
from bridged.faults.spec import Demand, FaultSpec, parse_demand, parse_spec

__all__ = ["CATALOG", "Area", "Demand", "FaultKind", "FaultPlan", "FaultSpec", "Hit", "Param", "Per",
           "Report", "Where", "kind", "parse_demand", "parse_spec"]
