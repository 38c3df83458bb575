"""The group's plan bookkeeping (no processes): which rank runs how many rows, and a fixed-capacity pass's bound."""

from __future__ import annotations

from dgserve.cluster.engine.plan import Admit, ItemKind, PlanItem, StepPlan
from dgserve.cluster.group import Ownership, capacity
from dgserve.model.settings import SamplerSettings


def test_a_fixed_capacity_bound_is_a_power_of_two_number_of_canvases_at_least_the_rows():
    assert [capacity(n, 32) for n in (0, 1, 32, 33, 64, 65, 200, 256, 257)] == [32, 32, 32, 64, 64, 128, 256, 256,
                                                                                512]


def test_rows_per_rank_count_canvases_and_encode_spans_of_requests_admitted_in_the_same_plan():
    own = Ownership(0, experts=True)
    s = SamplerSettings()
    first = StepPlan(1, admit=(Admit(1, (5,), s, 0, rank=0), Admit(2, (6,), s, 0, rank=1)),
                     items=(PlanItem(1, ItemKind.PREFILL, 0, 40), PlanItem(1, ItemKind.DENOISE),
                            PlanItem(2, ItemKind.DENOISE)))
    assert own.rows(first, 32) == {0: 72, 1: 32}
    own.part(first)
    later = StepPlan(2, items=(PlanItem(2, ItemKind.COMMIT, 1, 33), PlanItem(2, ItemKind.DENOISE)))
    assert own.rows(later, 32) == {1: 64}
