"""The page `dvc plots show` fills: Vega, Vega-Lite and Vega-Embed inlined, so it renders without internet.

DVC's default page loads the three libraries from a CDN, so it stays blank offline. `dvc plots show` takes an HTML
template instead (DVC's offline route: `plots.html_template` in `.dvc/config`, or `--html-template`); without a
`{scripts}` placeholder DVC adds no CDN links, and `{plot_divs}` receives the charts. This module writes that
template, with the libraries bundled by `vl-convert-python` (a PyPI package that ships them; nothing is
downloaded at run time and nothing is copied into this repository). The `plots_page` stage of `dvc.yaml` runs it:

    python -m pipeline.plots_page                 # writes reports/plots_template.html
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_OUT = Path("reports/plots_template.html")
VEGA_LITE_VERSION = "5.21"  # DVC's plot templates are Vega-Lite v5 specifications

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>T5 vs Reformer: DVC plots</title>
    <script type="text/javascript">
__BUNDLE__
    </script>
    <style>
        body { font-family: sans-serif; margin: 1em 2em; }
        body > div { display: inline-block; vertical-align: top; margin: 0 1em 1.5em 0; }
    </style>
</head>
<body>
    <h1>T5 vs Reformer</h1>
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


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.plots_page [--out PATH]`."""
    parser = argparse.ArgumentParser(description="Write the offline page template for `dvc plots show`.")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output file (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        written = write_template(args.out)
    except OSError as exc:
        print(f"error: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
