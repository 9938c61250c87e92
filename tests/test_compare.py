"""Comparing runs: rows, cost and time per 100M tokens, prediction errors and their flags, verdicts, formats, plots."""

import csv
import io
import json
import math

import pytest

from runner.compare import MemoryTerms, RunRecord, flag_lines, flags, render, rows, table, verdicts
from runner.plots import curve, curves, draw_terminal, write_png

MiB = 2**20


def rec(run_id="r1", host="local", *, job="quickstart", profile="cpu", price=0.0, tokens=400_000, wall_s=40.0,
        rate=11_000.0, best=0.73, final=0.74, first=8.3, budget=400_000, predicted_s=None, predicted=None,
        measured=None, state="succeeded", run_dir=None, mfu=None):
    return RunRecord(run_id=run_id, job=job, host=host, profile=profile, state=state, price_usd_per_hour=price,
                     tokens=tokens, wall_s=wall_s, tokens_per_s=rate, mfu=mfu, best_eval_loss=best,
                     final_eval_loss=final, first_eval_loss=first, budget_tokens=budget, predicted_seconds=predicted_s,
                     predicted_memory=predicted, measured_memory=measured, run_dir=run_dir)


def test_cost_is_price_times_wall_time_and_per_100m_tokens_scales_it():
    row = rows([rec(price=3.6, wall_s=100, tokens=1_000_000)])[0]
    assert row.cost_usd == pytest.approx(0.1)
    assert row.usd_per_100m_tokens == pytest.approx(10.0)
    assert row.seconds_per_100m_tokens == pytest.approx(10_000)
    assert not row.local


def test_free_hardware_shows_cost_as_local_in_every_format():
    r = rows([rec(price=0)])
    assert r[0].local
    assert "local" in render(r, [], "md")
    assert json.loads(render(r, [], "json"))["rows"][0]["cost_usd"] is None
    line = list(csv.DictReader(io.StringIO(render(r, [], "csv"))))[0]
    assert line["cost_usd"] == ""
    assert line["tokens_per_s"] == "11000.0"


def test_time_error_within_15_percent_is_not_flagged_and_beyond_is():
    assert flags(rec(wall_s=110, predicted_s=100)) == ()
    assert flags(rec(wall_s=130, predicted_s=100)) == ("time +30% vs plan",)
    assert rows([rec(wall_s=80, predicted_s=100)])[0].time_error_pct == pytest.approx(-20)


def test_memory_flag_names_the_term_of_the_model_that_was_off():
    predicted = MemoryTerms(weights_bytes=100 * MiB, gradients_bytes=100 * MiB, optimizer_bytes=200 * MiB,
                            peak_bytes=1000 * MiB)
    # Same static state; activations were twice what the model said.
    measured = MemoryTerms(100 * MiB, 100 * MiB, 200 * MiB, peak_bytes=1600 * MiB)
    (flag,) = flags(rec(predicted=predicted, measured=measured))
    assert flag == "peak memory +60% vs plan (activations, logits and runtime off by +600.0 MiB)"
    # The optimizer kept fp32 states where the plan assumed 8-bit ones.
    predicted_8bit = MemoryTerms(100 * MiB, 100 * MiB, 50 * MiB, peak_bytes=600 * MiB)
    (flag,) = flags(rec(predicted=predicted_8bit, measured=MemoryTerms(100 * MiB, 100 * MiB, 200 * MiB, 750 * MiB)))
    assert "optimizer states off by +150.0 MiB" in flag
    assert flags(rec(predicted=predicted, measured=MemoryTerms(100 * MiB, 100 * MiB, 200 * MiB, 1100 * MiB))) == ()


def test_rows_per_profile_sum_tokens_time_and_cost():
    a = rec("r1", "a100-1", profile="a100-80gb", price=1.8, tokens=1_000_000, wall_s=100, rate=10_000, best=0.9)
    b = rec("r2", "a100-2", profile="a100-80gb", price=1.8, tokens=3_000_000, wall_s=300, rate=20_000, best=0.8)
    c = rec("r3", "local", tokens=500_000, wall_s=1000, rate=500)
    by_profile = rows([a, b, c], by="profile")
    assert [r.profile for r in by_profile] == ["cpu", "a100-80gb"]  # free first
    a100 = by_profile[1]
    assert (a100.runs, a100.tokens, a100.wall_s) == (2, 4_000_000, 400)
    assert a100.cost_usd == pytest.approx(0.2)
    assert a100.tokens_per_s == pytest.approx(17_500)  # weighted by tokens
    assert a100.best_eval_loss == 0.8
    assert a100.host == "a100-1, a100-2"


def test_verdict_names_the_cheapest_fastest_and_best_loss_per_dollar_host():
    # 400k tokens: the 4090 takes 400 s at $0.36/h ($0.04), the A100 100 s at $2.88/h ($0.08).
    rtx = rec("r1", "rtx4090", profile="rtx-4090", price=0.36, wall_s=400, best=1.0, first=8.0)
    a100 = rec("r2", "a100", profile="a100-80gb", price=2.88, wall_s=100, best=0.5, first=8.0)
    (v,) = verdicts([rtx, a100])
    assert v.cheapest.host == "rtx4090" and v.fastest.host == "a100"
    # Loss drop per dollar: 7.0 / $0.04 = 175 on the 4090, 7.5 / $0.08 = 94 on the A100.
    assert v.best_loss_per_dollar.host == "rtx4090"
    assert v.line().startswith("quickstart: cheapest to reach 400k tokens: rtx4090 ($0.04); fastest: a100 (2m)")
    # Make the A100 cheap enough and it wins on both money counts.
    (v,) = verdicts([rtx, rec("r2", "a100", profile="a100-80gb", price=0.72, wall_s=100, best=0.5, first=8.0)])
    assert v.cheapest.host == "a100" and v.best_loss_per_dollar.host == "a100"


def test_verdict_extrapolates_to_the_budget_and_prefers_free_hosts_for_loss_per_dollar():
    half = rec("r1", "box", price=1.0, tokens=200_000, wall_s=100, budget=400_000, best=0.9)
    free = rec("r2", "local", price=0.0, tokens=400_000, wall_s=1000, best=1.2)
    (v,) = verdicts([half, free])
    box = next(h for h in v.hosts if h.host == "box")
    assert box.seconds_to_budget == pytest.approx(200) and box.usd_to_budget == pytest.approx(200 / 3600)
    assert v.cheapest.host == "local" and v.fastest.host == "box"
    assert v.best_loss_per_dollar.host == "local" and math.isinf(v.best_loss_per_dollar.loss_drop_per_usd)
    assert "local (free)" in v.line()


def test_verdict_counts_only_succeeded_runs_and_one_per_job():
    failed = rec("r1", "a100", price=2.0, wall_s=1, state="failed")
    other_job = rec("r3", "local", job="other")
    found = verdicts([failed, rec("r2", "local"), other_job])
    assert [(v.job, v.fastest.host) for v in found] == [("quickstart", "local"), ("other", "local")]
    assert verdicts([failed]) == []


def test_table_and_markdown_carry_every_run_and_the_verdict():
    records = [rec("r1", "local"), rec("r2", "box", price=1.0, wall_s=20)]
    text = render(rows(records), verdicts(records), "md")
    assert text.count("\n| r") == 2 and "- quickstart: cheapest" in text
    assert len(table(rows(records)).rows) == 2


def write_metrics(path, points, evals, rate=10_000.0):
    path.mkdir(parents=True, exist_ok=True)
    lines = [{"event": "eval", "step": 0, "tokens": 0, "eval_loss": 8.0}]
    for tokens, loss in points:
        lines.append({"event": "train", "tokens": tokens, "loss": loss, "elapsed_s": tokens / rate})
    lines += [{"event": "eval", "tokens": t, "eval_loss": loss} for t, loss in evals]
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{\"torn")


def test_curves_put_eval_losses_on_tokens_seconds_and_dollars(tmp_path):
    write_metrics(tmp_path / "a", [(1000, 5.0), (2000, 4.0)], [(2000, 3.5)])
    c = curve(rec(price=3.6, run_dir=str(tmp_path / "a")))
    assert c.kind == "eval loss" and c.loss == (8.0, 3.5)
    assert c.tokens == (0, 2000) and c.wall_s == pytest.approx((0.0, 0.2))
    assert c.usd == pytest.approx((0.0, 0.2 * 3.6 / 3600))


def test_plot_png_has_one_line_per_host(tmp_path):
    from PIL import Image

    write_metrics(tmp_path / "a", [(1000, 5.0), (2000, 4.0)], [(2000, 3.5)])
    write_metrics(tmp_path / "b", [(1000, 5.5), (2000, 4.5)], [(2000, 3.9)], rate=2000)
    records = [rec("r1", "local", run_dir=str(tmp_path / "a")), rec("r0", "box", run_dir=str(tmp_path / "b")),
               rec("r2", "box", price=1.0, run_dir=str(tmp_path / "b"))]
    drawn = curves(records)
    assert sorted(c.label for c in drawn) == ["box", "local"]
    out = write_png(drawn, tmp_path / "plot.png", title="quickstart")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(out).size == (1500, 450)


def test_on_a_terminal_flags_go_under_the_table_and_one_jobs_name_titles_it():
    records = [rec("r1", "local", predicted_s=10), rec("r2", "box", price=1.0, wall_s=20)]
    narrow = table(rows(records), narrow=True)
    headers = [c.header for c in narrow.columns]
    assert "flags" not in headers and "job" not in headers and narrow.title == "quickstart"
    assert flag_lines(rows(records)) == ["r1: time +300% vs plan"]
    assert flag_lines(rows(records, by="profile")) == ["r1: time +300% vs plan"]
    two_jobs = table(rows([rec("r1"), rec("r2", job="other")]), narrow=True)
    assert "job" in [c.header for c in two_jobs.columns] and two_jobs.title is None


def test_the_terminal_plot_draws_all_three_panels(tmp_path):
    write_metrics(tmp_path / "a", [(1000, 5.0), (2000, 4.0)], [(2000, 3.5)])
    write_metrics(tmp_path / "b", [(1000, 5.5), (2000, 4.5)], [(2000, 3.9)], rate=2000)
    text = draw_terminal(curves([rec("r1", "local", run_dir=str(tmp_path / "a")),
                                 rec("r2", "box", price=1.0, run_dir=str(tmp_path / "b"))]), width=120)
    for label in ("tokens", "wall time (s)", "cost (USD)"):
        assert label in text
    assert text.count("local") == 3 and text.count("box") == 3  # a legend per panel
