"""``fp8_loss_parity``'s report, with the training runs stood in for (they need a GPU)."""

from __future__ import annotations

import json
import sys

from toolkits.benchmark import fp8_loss_parity as parity

CURVES = {False: [10.0, 5.0, 4.0], True: [10.0, 5.1, 4.2]}  # bf16, fp8 losses at steps 1-3


def test_rerun_prints_the_run_to_run_spread_and_keeps_its_curve(monkeypatch, tmp_path, capsys):
    """``--rerun``: a second bf16 run's gap by the fp8 gap's measure, its curve in the JSON."""
    runs = []

    def train(opts, data, fp8):
        runs.append(fp8)
        losses = [4.1 if len(runs) == 3 and step == 3 else loss
                  for step, loss in enumerate(CURVES[fp8], 1)]
        return {step: (loss, 100.0, 1.0) for step, loss in enumerate(losses, 1)}

    monkeypatch.setattr(parity, "_preprocess", lambda out: "data")
    monkeypatch.setattr(parity, "_train", train)
    curves = tmp_path / "curves.json"
    monkeypatch.setattr(sys, "argv", ["fp8_loss_parity", "--iters", "3", "--window", "1",
                                      "--tolerance", "0.1", "--rerun", "--curves", str(curves)])
    assert parity.main() == 0  # fp8 5% above bf16 at the last step, within 10%
    assert runs == [False, True, False]
    out = capsys.readouterr().out
    assert "gap 5.00% (tolerance 10%)" in out
    assert "bf16 rerun: 4.1000, gap to the first bf16 run 2.50% (the run-to-run spread)" in out
    assert json.loads(curves.read_text())["bf16_rerun"] == {"1": 10.0, "2": 5.0, "3": 4.1}
