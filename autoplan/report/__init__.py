"""Plan visualization and explanation: ``autoplan show``, ``diff`` and ``explain``.

* ``explain``: reading a plan (grouped layers, breakdowns, diffs, per-op candidates);
* ``html``: the self-contained HTML report; ``static``: PNG/SVG summary (matplotlib);
* ``text``: terminal tables (rich when installed); ``commands``: the click commands.
"""
from __future__ import annotations

from autoplan.report.explain import diff_plans, explain_op, load_plan, segments

__all__ = ["diff_plans", "explain_op", "load_plan", "segments"]
