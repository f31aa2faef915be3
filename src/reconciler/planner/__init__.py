"""The planner: a pure function from desired and observed state to a Plan."""

from reconciler.planner._plan import Action, Change, Disruption, Plan
from reconciler.planner._planner import plan

__all__ = ["Action", "Change", "Disruption", "Plan", "plan"]
