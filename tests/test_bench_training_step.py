"""``bench_training_step --best-mbs``: each engine's fastest micro-batch size up to the first
that does not fit (the runs themselves need a GPU; here a stand-in measures)."""

from __future__ import annotations

from toolkits.benchmark import bench_training_step as bench

STEP_MS = {1: 10.0, 2: 15.0, 4: 40.0}  # tokens/s best at mbs 2; mbs 8 runs out of memory


def test_best_micro_batch_stops_at_the_first_size_that_does_not_fit(monkeypatch):
    """Sizes run in increasing order with ``--mbs`` set before the Megatron flags; the search
    stops at the out-of-memory size and keeps the fastest per token."""
    tried = []

    def measured(engine, argv):
        mbs = int(argv[len(argv) - 1 - argv[::-1].index("--mbs") + 1])
        tried.append((mbs, argv[argv.index("--"):]))
        return {"failed": "out of memory"} if mbs == 8 else {"step_ms": STEP_MS[mbs]}

    monkeypatch.setattr(bench, "_spawn", measured)
    best = bench.best_micro_batch("mcore", ["--mbs", "4", "--", "--foo"], [4, 1, 2, 8, 16])
    assert best == {"step_ms": 15.0, "mbs": 2}
    assert tried == [(1, ["--", "--foo"]), (2, ["--", "--foo"]), (4, ["--", "--foo"]),
                     (8, ["--", "--foo"])]


def test_best_micro_batch_reports_why_nothing_fit(monkeypatch):
    monkeypatch.setattr(bench, "_spawn", lambda engine, argv: {"failed": "out of memory"})
    assert bench.best_micro_batch("hf", [], [2, 4]) == {"failed": "out of memory", "mbs": 2}
