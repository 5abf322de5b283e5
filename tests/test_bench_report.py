"""Unit tests of the benchmark's statistics, table, target checks and JSON record.

Only bookkeeping is tested here: no system is started and nothing is timed.
"""

import json
import re
from argparse import Namespace

import pytest

from bench import report, runner
from bench.run import read_child_results, sizing
from bench.systems import System
from bench.workloads import BY_NAME, TARGETS, WORKLOADS, select


def entry(values, size=100, **kw):
    base = {"size": size, "repeats": len(values), "raw": [], "values": list(values),
            "na": None, "error": None}  # fmt: skip
    base.update(kw)
    return base


def results_with(**systems):
    return {"meta": {}, "systems": {
        name: {"available": True, "reason": None, "versions": {}, "workloads": wl}
        for name, wl in systems.items()
    }}  # fmt: skip


def test_summarize_gives_median_min_max_and_count():
    assert report.summarize([3.0, 1.0, 2.0, 10.0]) == {
        "median": 2.5, "min": 1.0, "max": 10.0, "n": 4,
    }  # fmt: skip


def test_summarize_of_nothing_is_none():
    assert report.summarize([]) is None


@pytest.mark.parametrize(
    "value, text",
    [(18_712.4, "18,712"), (157.4, "157"), (11.34, "11.3"), (6.804, "6.80"),
     (0.04213, "0.0421"), (0, "0")],
)  # fmt: skip
def test_fmt_number_keeps_about_three_significant_figures(value, text):
    assert report.fmt_number(value) == text


def test_latency_value_is_milliseconds_per_call():
    assert BY_NAME["apply_lb"].value(2.0, 500) == pytest.approx(4.0)


def test_rate_value_is_items_per_second():
    assert BY_NAME["tasks_one_by_one"].value(4.0, 10_000) == pytest.approx(2500.0)


def test_bandwidth_value_is_decimal_megabytes_per_second():
    assert BY_NAME["push"].value(0.5, 100_000_000) == pytest.approx(200.0)


def test_memory_value_is_megabytes_of_raw_bytes():
    assert BY_NAME["scale_memory"].value(150_000_000, 100_000) == pytest.approx(150.0)


def test_non_positive_elapsed_time_is_rejected():
    with pytest.raises(ValueError, match="positive"):
        BY_NAME["apply_lb"].value(0.0, 10)


def test_select_accepts_groups_and_names_in_table_order():
    chosen = [w.name for w in select("push,latency")]
    assert chosen == ["execute", "apply_direct", "apply_lb", "push"]


def test_select_names_unknown_workloads_and_the_choices():
    with pytest.raises(ValueError, match="unknown workload.*nope.*choose from groups"):
        select("latency,nope")


def test_every_target_names_known_workloads():
    for target in TARGETS:
        assert target.workload in BY_NAME
        assert not target.ref_system or target.ref_workload in BY_NAME


def test_quick_sizing_is_never_larger_than_full():
    for w in WORKLOADS:
        assert w.sizing(True)[0] <= w.sizing(False)[0]


def test_size_override_and_repeats_apply_but_scale_runs_once():
    args = Namespace(quick=True, repeats=7, size=["chain_after=50", "scale_memory=1_000"])
    sizes, repeats = sizing(args)
    assert sizes["chain_after"] == 50 and sizes["scale_memory"] == 1000
    assert repeats["chain_after"] == 7 and repeats["scale_memory"] == 1


@pytest.mark.parametrize("bad", ["push", "nope=5", "push=0", "push=ten"])
def test_malformed_size_override_is_rejected(bad):
    with pytest.raises(ValueError, match="WORKLOAD=N"):
        sizing(Namespace(quick=False, repeats=None, size=[bad]))


def test_cell_shows_median_and_range_or_why_not():
    results = results_with(
        dask={"apply_lb": entry([12.0, 10.0, 11.0]), "execute": entry([], na="no equivalent"),
              "push": entry([], error="boom")},
    )  # fmt: skip
    assert report.cell(results, "dask", "apply_lb") == "11.0 (10.0-12.0)"
    assert report.cell(results, "dask", "execute") == "n/a"
    assert report.cell(results, "dask", "push") == "error"
    assert report.cell(results, "dask", "pull") == "-"
    assert report.cell(results, "ipyparallel", "apply_lb") == "-"


def test_single_run_cell_has_no_range():
    results = results_with(dask={"scale_memory": entry([80.0])})
    assert report.cell(results, "dask", "scale_memory") == "80.0"


def test_unavailable_system_is_shown_and_explained():
    results = results_with()
    results["systems"]["txkernel-native"] = {
        "available": False, "reason": "no native adapter yet", "versions": {}, "workloads": {},
    }  # fmt: skip
    assert report.cell(results, "txkernel-native", "apply_lb") == "unavailable"
    assert "txkernel-native: unavailable: no native adapter yet" in report.notes_for(results)


def test_table_has_a_column_per_system_and_txkernel_over_peer_ratios():
    results = results_with(
        **{"txkernel-foolscap": {"apply_lb": entry([1.0, 1.0])},
           "ipyparallel": {"apply_lb": entry([5.0, 5.0])},
           "dask": {"apply_lb": entry([10.0, 10.0])}}
    )  # fmt: skip
    lines = report.table(results).splitlines()
    header = lines[0].split()
    assert header[4:] == ["txkernel-foolscap", "ipyparallel", "dask",
                          "foolscap/ipp", "foolscap/dask"]  # fmt: skip
    row = lines[2].split()
    assert row[0] == "apply_lb" and row[-2:] == ["0.20x", "0.10x"]


def test_table_without_txkernel_keeps_a_txkernel_column_of_dashes():
    results = results_with(ipyparallel={"apply_lb": entry([5.0])})
    lines = report.table(results).splitlines()
    header, row = (re.split(r"\s{2,}", line) for line in (lines[0], lines[2]))
    assert header[4] == "txkernel" and row[4] == "-"
    assert header[-1] == "txkernel/ipp" and row[-1] == "n/a"


def test_table_lists_failures_under_it():
    results = results_with(dask={"push": entry([400.0], error="TimeoutError: slow")})
    text = report.table(results)
    assert "dask push (1 of 1 runs ok): TimeoutError: slow" in text
    assert "400 (" not in text and "400 !" in text


def test_ratio_is_missing_when_either_side_is():
    assert report.ratio(None, 2.0) == "n/a"
    assert report.ratio(2.0, None) == "n/a"
    assert report.ratio(3.0, 2.0) == "1.50x"


def test_target_for_lower_is_better_counts_how_many_times_faster():
    target = next(t for t in TARGETS if t.workload == "apply_direct" and t.ref_system == "dask")
    results = results_with(txkernel={"apply_direct": entry([1.0])},
                           dask={"apply_direct": entry([8.0])})  # fmt: skip
    assert report.check_target(results, target, "txkernel")[0] == "met"
    results["systems"]["dask"]["workloads"]["apply_direct"] = entry([7.9])
    assert report.check_target(results, target, "txkernel")[0] == "missed"


def test_target_against_loopback_accepts_a_fraction():
    target = next(t for t in TARGETS if t.workload == "push")
    results = results_with(txkernel={"push": entry([1000.0])},
                           loopback={"tcp_bandwidth": entry([2000.0])})  # fmt: skip
    assert report.check_target(results, target, "txkernel")[0] == "met"
    results["systems"]["txkernel"]["workloads"]["push"] = entry([999.0])
    assert report.check_target(results, target, "txkernel")[0] == "missed"


def test_absolute_memory_target_and_missing_reference():
    memory = next(t for t in TARGETS if t.workload == "scale_memory")
    results = results_with(txkernel={"scale_memory": entry([150.0]),
                                     "chain_after": entry([100.0])})  # fmt: skip
    assert report.check_target(results, memory, "txkernel")[0] == "met"
    chain = next(t for t in TARGETS if t.workload == "chain_after")
    status, detail = report.check_target(results, chain, "txkernel")
    assert status == "n/a" and "dask has no chain_after" in detail


def test_targets_summary_without_txkernel_says_so():
    assert "no txkernel system" in report.targets_summary(results_with(dask={}))


def test_save_json_writes_the_results_and_leaves_no_temporary(tmp_path):
    results = results_with(dask={"apply_lb": entry([1.5])})
    path = report.save_json(results, tmp_path / "results", "20261122T110000Z")
    assert path.name == "20261122T110000Z.json"
    assert json.loads(path.read_text()) == results
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_child_results_are_assembled_from_json_lines(tmp_path):
    out = tmp_path / "results.jsonl"
    lines = [
        {"type": "system", "name": "dask", "available": True, "reason": None,
         "versions": {"dask": "1"}},
        {"type": "workload", "name": "push", **entry([300.0])},
    ]  # fmt: skip
    out.write_text("".join(json.dumps(line) + "\n" for line in lines))
    got = read_child_results(out, "dask")
    assert got["versions"] == {"dask": "1"}
    assert got["workloads"]["push"]["values"] == [300.0]


def test_missing_child_results_are_an_error(tmp_path):
    got = read_child_results(tmp_path / "absent.jsonl", "dask")
    assert got["error"] == "measuring process wrote no results"


def test_probes_are_grouped_standalone_first_and_scale_last():
    chosen = select("scale,push,pull,startup,apply_lb")
    sizes = {w.name: w.size for w in chosen}
    repeats = {w.name: w.repeats for w in chosen}
    groups = runner.group_by_probe(chosen, sizes, repeats)
    assert [g[0] for g in groups] == ["startup", "apply_lb", "push_pull", "scale_memory"]
    assert [w.name for w in groups[2][1]] == ["push", "pull"]


def test_measure_converts_raw_results_and_keeps_extras():
    calls = []

    def probe(size):
        calls.append(size)
        return {"push": 0.5, "pull": 0.25, "_note": size}

    members = [BY_NAME["push"], BY_NAME["pull"]]
    entries = runner.measure(probe, members, 1_000_000, 2, warmup=True, log=lambda s: None)
    assert calls == [100_000, 1_000_000, 1_000_000]
    push, pull = entries
    assert push["name"] == "push" and push["values"] == [2.0, 2.0]
    assert pull["values"] == [4.0, 4.0] and pull["extra"] == [{"_note": 1_000_000}] * 2


def test_measure_records_a_failing_probe_as_an_error():
    def probe(size):
        raise RuntimeError("engine died")

    (got,) = runner.measure(probe, [BY_NAME["apply_lb"]], 10, 3, False, lambda s: None)
    assert got["error"] == "RuntimeError: engine died" and got["values"] == []


class FakeSystem(System):
    """Records lifecycle calls and probes; measures nothing real."""

    name = "fake"
    not_applicable = {"pull": "no pulling here"}

    def __init__(self):
        self.calls = []

    def start(self):
        self.calls.append("start")

    def stop(self):
        self.calls.append("stop")

    def probe_startup(self, size):
        self.calls.append("startup")
        return {"startup": 1.0}

    def probe_push_pull(self, size):
        self.calls.append("push_pull")
        return {"push": 0.5, "pull": 0.5}

    def probe_scale_memory(self, size):
        self.calls.append("scale")
        return {"scale_memory": 64_000_000}


def test_run_system_orders_lifecycle_and_gives_scale_a_fresh_cluster(tmp_path, monkeypatch):
    monkeypatch.setattr(runner.signal, "signal", lambda *a: None)
    system, out = FakeSystem(), tmp_path / "out.jsonl"
    chosen = select("scale,push,pull,startup,tcp_rtt")
    sizes = {w.name: 10 for w in chosen}
    repeats = {w.name: 1 for w in chosen}
    runner.run_system(system, chosen, sizes, repeats, out)
    assert system.calls == ["startup", "start", "push_pull", "stop", "start", "scale", "stop"]
    got = read_child_results(out, "fake")
    assert got["workloads"]["pull"]["na"] == "no pulling here"
    assert got["workloads"]["scale_memory"]["values"] == [64.0]
    assert "tcp_rtt" not in got["workloads"]  # a probe the system lacks is not a row
