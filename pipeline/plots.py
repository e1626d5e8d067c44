"""What `dvc plots show` draws besides the benchmark tables: the loss curves of every run on one chart per stage,
and the page that holds the charts, which renders offline.

`python -m pipeline.plots` (the `plots` stage of `dvc.yaml`) writes:

- `metrics/loss/<stage>.csv` for `pretrain` and `finetune`: every run's training and validation loss history
  (`metrics/<stage>/<variant>-<seed>-{train,val}.csv`, written by the training stages) in one long table with
  columns `run` (`<variant>-<seed>`), `split` (`train` or `val`), `step`, `tokens`, `loss`. The top-level
  `plots:` of `dvc.yaml` draw each with the template `.dvc/plots/loss.json`: colour = run, dash = split, so all
  variants and seeds, train and validation, share one chart; `dvc plots diff` adds the other revision's curves.
- `reports/plots_template.html`: the page `dvc plots show` fills (`plots.html_template` in `.dvc/config`, DVC's
  offline route). DVC's default page loads Vega, Vega-Lite and Vega-Embed from a CDN and stays blank offline;
  this one has them inlined from `vl-convert-python`, a PyPI package that ships them (nothing is downloaded at
  run time, nothing is copied into this repository). Without a `{scripts}` placeholder DVC adds no CDN links.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

from pipeline.files import StageError, read_numeric_csv

DEFAULT_TEMPLATE = Path("reports/plots_template.html")
LOSS_DIR = Path("metrics/loss")
STAGES = ("pretrain", "finetune")
LOSS_COLUMNS = ["run", "split", "step", "tokens", "loss"]
HISTORY = re.compile(r"^(?P<run>.+)-(?P<split>train|val)\.csv$")
VEGA_LITE_VERSION = "5.21"  # DVC's plot templates are Vega-Lite v5 specifications

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>Model variants compared: DVC plots</title>
    <script type="text/javascript">
__BUNDLE__
    </script>
    <style>
        body { font-family: sans-serif; margin: 1em 2em; }
        body > div { display: inline-block; vertical-align: top; margin: 0 1em 1.5em 0; }
    </style>
</head>
<body>
    <h1>Model variants compared</h1>
    <p>Written by <code>dvc plots show</code> from the project's <code>plots:</code> (see <code>dvc.yaml</code>);
    works offline.</p>
    {plot_divs}
</body>
</html>
"""


def page_template() -> str:
    """The HTML template, with the Vega libraries inlined (they define `vegaEmbed`, `vega` and `vegaLite`)."""
    import vl_convert

    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE_VERSION)
    bundle = bundle.replace("</script", "<\\/script")  # cannot end the inline script early
    return PAGE.replace("__BUNDLE__", bundle)


def write_template(path: str | Path) -> Path:
    """Write the template to `path` (atomically: a half-written page never replaces a good one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page_template(), encoding="utf-8")
    tmp.replace(path)
    return path


def combined_losses(directory: str | Path) -> list[dict[str, str]]:
    """Every `<run>-{train,val}.csv` loss history in `directory` as rows of `LOSS_COLUMNS`, sorted by run, split."""
    rows: list[dict[str, str]] = []
    for path in sorted(Path(directory).glob("*.csv")):
        match = HISTORY.match(path.name)
        if not match:
            continue
        fix = f"re-run `dvc repro -f {Path(directory).name}@{match['run']}` (it rewrites the loss history)"
        for record in read_numeric_csv(path, fix):
            if "loss" not in record:
                continue
            rows.append(
                {
                    "run": match["run"],
                    "split": match["split"],
                    "step": _number(record.get("step")),
                    "tokens": _number(record.get("tokens")),
                    "loss": repr(record["loss"]),
                }
            )
    return rows


def _number(value: float | None) -> str:
    """A CSV cell for a step or token count read back as a float: `2`, not `2.0`; empty when absent."""
    if value is None:
        return ""
    return str(int(value)) if value.is_integer() else repr(value)


def write_losses(root: str | Path, stage: str) -> Path:
    """`metrics/loss/<stage>.csv` from `metrics/<stage>/` (atomically); header only when no run has finished."""
    root = Path(root)
    out = root / LOSS_DIR / f"{stage}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, LOSS_COLUMNS)
        writer.writeheader()
        writer.writerows(combined_losses(root / "metrics" / stage))
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.plots [--template PATH]`: the combined loss tables and the offline page template."""
    parser = argparse.ArgumentParser(description="Write the inputs of `dvc plots show` (see pipeline/plots.py).")
    parser.add_argument("--template", default=str(DEFAULT_TEMPLATE), help="page template (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        written = [write_losses(Path.cwd(), stage) for stage in STAGES]
        written.append(write_template(args.template))
    except StageError as exc:  # a corrupt loss history
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot write {exc.filename or args.template}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
