"""The comparison report: `inputs.py` gathers what the stages wrote, `analysis.py` computes the numbers (statistics
from `stats.py`) that `metrics/compare.json` holds, `rendering.py` writes `reports/comparison.md` from
`templates/` and draws the charts (`charts.py`)."""
