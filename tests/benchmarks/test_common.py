"""The pure helpers of benchmarks/common.py: thread budgets, the load verdict, repeat summaries, token checks."""

from __future__ import annotations

import pytest

from benchmarks.common import (
    Threads,
    check_tokens,
    compare_sides,
    dgserve_threads,
    first_difference,
    load_verdict,
    median_run,
    pairwise_ratios,
    spread,
    threads_report,
    unit_threads,
)


@pytest.mark.parametrize("budget", [1, 2, 3, 8])
def test_dgserve_runs_the_references_torch_threads_and_no_helper(budget):
    # float32 results (so the sampled tokens) depend on torch's thread count: equal work needs equal torch threads
    t = dgserve_threads(budget)
    assert t == Threads(torch=budget)
    assert (t.total, t.prefetch, t.sampler_threads) == (budget, False, 1)


def test_budget_must_be_positive():
    with pytest.raises(ValueError):
        dgserve_threads(0)
    with pytest.raises(ValueError):
        unit_threads(0)


def test_unit_threads_fit_the_budget_and_name_the_sampler_pool():
    assert unit_threads(1) == Threads(torch=1)
    assert unit_threads(3).total == 3
    t = unit_threads(2, sampler_threads=3)
    assert (t.torch, t.noise_worker, t.sampler_pool, t.sampler_threads, t.total) == (2, 0, 2, 3, 4)


def test_threads_report_flags_unequal_budgets():
    lines, js = threads_report(2, "rule", {"a": Threads(2), "b": Threads(1, noise_worker=1)})
    assert js["equal"] and not any("UNEQUAL" in x for x in lines)
    assert js["b"] == {"total": 2, "torch": 1, "noise_worker": 1, "sampler_pool": 0, "prefetch_noise": True,
                       "sampler_threads": 1}
    lines, js = threads_report(2, "rule", {"a": Threads(2), "b": Threads(2, noise_worker=1)})
    assert not js["equal"] and any("UNEQUAL" in x for x in lines)


def test_rows_above_the_budget_do_not_make_it_unequal():
    lines, js = threads_report(1, "rule", {"N": Threads(1)}, {"pool": Threads(1, sampler_pool=1)})
    assert js["equal"] and js["pool"]["total"] == 2
    assert any("above the budget" in x for x in lines)


def test_load_verdict_quiet_machine():
    assert load_verdict(before=0.3, after=1.2, cpus=2, own=1) == []


def test_load_verdict_busy_before():
    (w,) = load_verdict(before=2.5, after=1.0, cpus=2, own=1)
    assert w.startswith("WARNING: machine busy before")


def test_load_verdict_busy_during():
    (w,) = load_verdict(before=0.0, after=3.1, cpus=2, own=2)
    assert w.startswith("WARNING: machine busy during")
    assert load_verdict(before=0.0, after=2.9, cpus=2, own=2) == []  # own threads + 0.5 per core is allowed


def test_load_threshold_scales_with_cores():
    assert load_verdict(before=4.0, after=4.0, cpus=16, own=4) == []
    assert len(load_verdict(before=4.0, after=4.0, cpus=2, own=1)) == 2


def test_spread_min_median_max():
    assert spread([3.0, 1.0, 2.0]) == {"min": 1.0, "median": 2.0, "max": 3.0, "n": 3}
    assert spread([5.0]) == {"min": 5.0, "median": 5.0, "max": 5.0, "n": 1}
    assert spread([4.0, 1.0, 2.0, 3.0])["median"] == 3.0  # the upper middle: one of the runs
    with pytest.raises(ValueError):
        spread([])


def test_pairwise_ratios():
    assert pairwise_ratios([2.0, 9.0], [1.0, 3.0]) == [2.0, 3.0]
    with pytest.raises(ValueError):
        pairwise_ratios([1.0], [1.0, 2.0])


def test_median_run_keeps_that_run_and_adds_the_spread():
    runs = [{"tokens_per_s": 3.0, "wall_s": 1}, {"tokens_per_s": 1.0, "wall_s": 3}, {"tokens_per_s": 2.0, "wall_s": 2}]
    r = median_run(runs)
    assert r["wall_s"] == 2 and r["repeats"] == 3
    assert r["tokens_per_s_spread"] == {"min": 1.0, "median": 2.0, "max": 3.0, "n": 3}


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert "index 1: 2 vs 5" in first_difference([1, 2, 3], [1, 5, 3])
    assert "lengths differ (3 vs 2)" in first_difference([1, 2, 3], [1, 2])


def test_check_tokens_exact_and_agreement():
    ok = check_tokens([("a", [1, 2], [1, 2]), ("b", [3, 4], [3, 4])])
    assert ok["same_tokens"] is True and ok["agreement"] == 1.0 and ok["mismatches"] == []
    bad = check_tokens([("a", [1, 2], [1, 2]), ("b", [3, 4], [3, 9])])
    assert bad["same_tokens"] is False and bad["agreement"] == 0.75
    assert bad["mismatches"] == ["b: first difference at generated index 1: 4 vs 9"]
    assert check_tokens([("b", [3, 4], [3, 9])], exact=False)["same_tokens"] is None


def test_compare_sides_ratio_and_tokens():
    def run(tps, ids):
        return {"tokens_per_s": tps, "token_ids": ids}

    runs = {"one": {1: [run(10.0, [[1]])], 4: [run(20.0, [[1], [2]]), run(40.0, [[1], [2]])]},
            "two": {1: [run(5.0, [[1]])], 4: [run(10.0, [[1], [2]]), run(30.0, [[1], [7]])]}}
    rows, ratio, tokens = compare_sides(runs, "one", "two")
    assert ratio == {"min": 0.5, "median": 0.75, "max": 0.75, "n": 2}  # at the largest N, repeat by repeat
    assert tokens["same_tokens"] is False
    assert tokens["mismatches"] == ["N=4 run 1 request 1: first difference at generated index 0: 2 vs 7"]
    assert "token_ids" not in rows["one"][4] and rows["one"][4]["tokens_per_s"] == 40.0
