"""The flow-matching bench rows' plumbing on the tiny SD3 components: every case runs, the table has a row per case
with the ratios against stock measured in the same run."""

from guidekit.apps.bench_flow import FLOW_CASES, flow_rows, format_flow_table


def test_flow_rows_time_every_case_against_stock():
    rows = flow_rows(["sd3"], rounds=1, steps=1)
    assert [r["case"] for r in rows] == list(FLOW_CASES)
    stock = rows[0]
    assert stock["ratio"] == 1.0 and stock["cpu_ratio"] == 1.0
    for row in rows:
        assert row["wall_s"] > 0 and row["ratio"] == row["wall_s"] / stock["wall_s"]
    table = format_flow_table(rows)
    assert table.count("\n| sd3 |") == 3 and "CPU vs stock" in table
