"""The offline page for `dvc plots show`: the Vega libraries are inlined, and a chart renders with no network."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline import plots_page
from tests.browser import render, visible_text


def test_template_inlines_the_libraries_and_loads_nothing_from_the_network(tmp_path: Path):
    path = plots_page.write_template(tmp_path / "reports" / "plots_template.html")
    page = path.read_text(encoding="utf-8")
    assert "{plot_divs}" in page and "{scripts}" not in page  # DVC adds CDN links only through `{scripts}`
    assert not re.search(r"<script[^>]+src=", page)
    assert "window.vegaEmbed=" in page and len(page) > 200_000
    assert plots_page.main(["--out", str(tmp_path / "again.html")]) == 0


def test_unwritable_output_is_one_clear_error(tmp_path: Path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert plots_page.main(["--out", str(blocker / "page.html")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write") and "Traceback" not in err


def test_a_dvc_chart_renders_offline_in_headless_chromium(tmp_path: Path):
    from dvc_render import render_html
    from dvc_render.vega import VegaRenderer

    template = plots_page.write_template(tmp_path / "template.html")
    points = [
        {"step": s, "loss": 6.0 - 0.2 * s + 0.1 * i, "rev": "workspace", "filename": name, "field": "loss"}
        for i, name in enumerate(["metrics/pretrain/t5-0-train.csv", "metrics/pretrain/reformer-0-train.csv"])
        for s in range(10)
    ]
    renderer = VegaRenderer(points, "pretrain_loss", x="step", y="loss", template="linear", title="Pretraining loss")
    index = Path(render_html([renderer], tmp_path / "dvc_plots" / "index.html", html_template=str(template)))
    assert "cdn" not in index.read_text(encoding="utf-8")[:2000]

    dom = render(index.as_uri(), screenshot=tmp_path / "plots.png")
    assert re.search(r'<svg[^>]*class="marks"', dom) or re.search(r'<canvas[^>]*class="marks"', dom)
    text = visible_text(dom)
    assert "Pretraining loss" in text and "workspace" in text  # title and legend drawn by Vega
    assert (tmp_path / "plots.png").stat().st_size > 5000
