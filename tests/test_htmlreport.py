"""The batch's HTML page (pipeline.outputs.html): built from a real small run, checked as HTML,
against hostile series ids and group values, and rendered in a real headless Chromium."""
from __future__ import annotations

import base64
import hashlib
import io
import os
import pathlib
import re
from html.parser import HTMLParser
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
from services import missing

from flows._common import parser, run_flow
from flows.run import run
from pipeline import config as C
from pipeline.data.prepare import REPORT_SCHEMA, Prepared
from pipeline.data.series import SeriesArrays
from pipeline.forecasting.backtest import backtest, concat_columns
from pipeline.forecasting.final import final_forecast
from pipeline.outputs import html as htmlreport
from pipeline.outputs import html_series, plots
from pipeline.stages.forecast import Forecast
from pipeline.stages.steps import Outcome, Scored
from pipeline.training.plan import Job

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,1000"]
HOSTILE = ["<script>alert(1)</script>", "<img src=x onerror=alert(2)>", 'a&b "q" \'s\'',
           "$\\frac{1$", "plain"]                         # the 4th: no mathtext in titles
TAGS = {"html", "head", "meta", "link", "title", "style", "body", "header", "h1", "h2", "h3",
        "dl", "dt", "dd", "section", "table", "thead", "tbody", "tr", "th", "td", "p", "ul",
        "li", "code", "img", "figure", "figcaption", "span", "a", "b", "script"}


class Page(HTMLParser):
    """The parts of a page the tests look at: tags, images, links, the CSP, scripts' texts,
    the header's items, each table's cell texts and cell attributes."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags, self.images, self.links, self.tables, self.cells = [], [], [], {}, {}
        self.scripts, self.header, self.csp = [], {}, None
        self._table = self._row = self._attrs = None
        self._cell: list[str] | None = None
        self._text: list[str] | None = None      # a <script>, <dt> or <dd> being read
        self._dt = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        elif tag == "a":
            self.links.append(attrs)
        elif tag == "meta" and attrs.get("http-equiv") == "Content-Security-Policy":
            self.csp = attrs["content"]
        elif tag in ("script", "dt", "dd"):
            self._text = []
        elif tag == "table":
            self._table = self.tables.setdefault(attrs.get("id"), [])
            self._attrs = self.cells.setdefault(attrs.get("id"), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
            self._attrs.append([])
        elif tag in ("td", "th"):
            self._cell = []
            self._attrs[-1].append(attrs)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "script":
            self.scripts.append("".join(self._text))
        elif tag == "dt":
            self._dt = "".join(self._text)
        elif tag == "dd":
            self.header[self._dt] = "".join(self._text)
        if tag in ("script", "dt", "dd"):
            self._text = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._text is not None:
            self._text.append(data)


@pytest.fixture(scope="module")
def batch(demo_dir, tmp_path_factory):
    """A finished `run` flow on the demo data: one epoch of a small quantile GRU, published
    whatever its backtest (`evaluate.select: network`: the figure shows its interval)."""
    out = tmp_path_factory.mktemp("htmlreport")
    args = parser("run", "").parse_args([
        "--config", "configs/demo.yaml", "--set", f"data.path={demo_dir}", "--set",
        f"output.path={out}", "--set", "ray.enabled=false", "--set", "tracking.enabled=false",
        "--set", "train.epochs=1", "--set", "train.steps_per_epoch=2", "--set",
        "windows.lookback=72", "--set", "model.encoder.hidden_size=8", "--set",
        "model.loss=quantile", "--set", "model.quantiles=[0.1,0.5,0.9]", "--set",
        "evaluate.comparators=[auto_theta]", "--set", "evaluate.comparator_history=100",
        "--set", "evaluate.select=network"])
    b = run_flow(run, args, record=False)
    assert b.exit_code == 0
    return b


@pytest.fixture(scope="module")
def page(batch, tmp_path_factory):
    path = htmlreport.write(batch, batch.outcome, tmp_path_factory.mktemp("page") / "report.html")
    with open(path, encoding="utf-8") as f:
        return path, f.read()


def hostile_batch(*overrides: str) -> SimpleNamespace:
    """A batch-shaped object whose series ids and group values are markup: baselines-only
    backtest, fallback forecasts, a skipped series in the report (`overrides`: config
    `section.key=value` items)."""
    cfg = C.load(None, ["windows.lookback=24", "windows.horizon=6", "data.calendar=[]",
                        "evaluate.plots=5", "evaluate.comparators=[]", *overrides])
    arrays = SeriesArrays.from_list([np.sin(np.arange(200) / 4) * 5 + 10 + i for i in range(5)],
                                    ids=HOSTILE)
    arrays.groups = np.array(["<b>North</b>", "East & West", "<b>North</b>", "x", "x"],
                             dtype=object)
    job = Job("global", np.arange(len(arrays)))
    bt = backtest(arrays, [job], {}, cfg)
    report = pl.DataFrame([{"series": HOSTILE[0], "file": "<f>", "issue": "too_short",
                            "action": "skipped", "detail": "1 < 2"}], schema=REPORT_SCHEMA)
    outcome = Outcome(Prepared(arrays, report, 1, 800, 0.0, None),
                      scored=Scored(bt, bt.summary(), [], concat_columns(bt.frames)),
                      forecast=Forecast(None, cols=final_forecast(arrays, [], {}, cfg)))
    return SimpleNamespace(cfg=cfg, outcome=outcome, seconds={"data": 0.1}, failed_jobs=[],
                           run_id="r1", batch_id="b1", flow="<flow>")


# ---------------------------------------------------------------- the page of a real run

@pytest.mark.slow
def test_leaderboard_has_the_model_first_then_the_baselines_with_the_summary(batch, page):
    rows = Page(page[1]).tables["leaderboard"]
    head, body = rows[0], rows[1:]
    assert head[:7] == ["model", "mae", "rmse", "smape", "mase", "wape", "skill_mase"]
    assert [r[0] for r in body] == ["gru_direct", "auto_theta", "naive", "seasonal_naive"]
    summary = batch.outcome.scored.summary
    for r in body:
        for name, cell in zip(head[1:], r[1:], strict=True):
            want = summary[r[0]].get(name)
            assert cell == (f"{want:.4f}" if want is not None else "–"), (r[0], name)


@pytest.mark.slow
def test_page_is_one_file_with_every_section_and_inlined_pngs(batch, page):
    path, text = page
    p = Page(text)
    assert set(p.tags) <= TAGS and p.scripts == [htmlreport.SCRIPT]     # ours alone
    pngs = [base64.b64decode(i["src"].split(",", 1)[1]) for i in p.images]
    assert all(i["src"].startswith("data:image/png;base64,") for i in p.images)
    assert all(b.startswith(b"\x89PNG\r\n\x1a\n") and len(b) > 5000 for b in pngs)
    assert len(pngs) == 1 + 6            # the error histograms and evaluate.plots series
    assert len(set(pngs)) == len(pngs)
    assert "http://" not in text and "https://" not in text
    groups = p.tables["groups"]
    assert [r[0] for r in groups[1:]] == ["store_A", "store_B", "store_C", "store_D"]
    counts = {(r[0], r[1]): int(r[2]) for r in p.tables["validation"][1:]}
    assert counts[("too_short", "skipped")] == 2
    assert "S0001" in text and batch.run_id in text
    assert p.header["data"] == "40 series (38 usable), frequency 1h, data end 2024-06-30 23:00"
    assert p.header["horizon"] == "24 steps ahead: 2024-07-01 00:00 to 2024-07-01 23:00"
    assert re.search(r"series × 24 steps — the model gru_direct; \d+ by fallback:seasonal_naive",
                     text)
    assert "How to read this" in text and "<code>MASE</code> divides the miss" in text
    assert groups[0][:3] == ["group", "mase gru_direct", "mase auto_theta"]   # comparators
    assert [r[1] for r in p.tables["training"][1:]] == ["global", "global"]


@pytest.mark.slow
def test_series_figure_has_labels_baselines_and_the_interval(batch, monkeypatch, tmp_path):
    o, cfg = batch.outcome, batch.cfg
    cols, preds, arrays = o.forecast.cols, o.scored.predictions, o.data.arrays
    sid = plots.choose(cols, 1)[0]
    figs = []
    real = plots._png
    monkeypatch.setattr(plots, "_png", lambda fig: figs.append(fig) or real(fig))
    png = plots.series_png(arrays, sid, cols, preds, 24, cfg.model.quantiles, "sales")
    ax = figs[0].axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("time", "sales")
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert lines["seasonal naive"].get_linestyle() == "--"
    assert lines["naive"].get_linestyle() == ":"
    bt = lines["backtest (gru_direct)"].get_xdata()
    assert np.array_equal(lines["naive"].get_xdata(), bt)     # the same (latest) cutoff
    assert np.array_equal(lines["seasonal naive"].get_xdata(), bt)
    assert {"forecast interval", "backtest interval"} <= {c.get_label() for c in ax.collections}
    monkeypatch.undo()
    written = plots.plot_sample(str(tmp_path), arrays, cols, preds, 1, 24, cfg.model.quantiles,
                                "sales")                     # the files share the drawing
    assert [os.path.basename(p) for p in written] == [f"{sid}.png"]
    with open(written[0], "rb") as f:
        assert f.read() == png


@pytest.mark.slow
def test_the_table_of_series_has_each_series_its_published_model_mase_and_next_values(batch,
                                                                                       page):
    """One row per forecast series: the forecast's model and group, backtest MASE of that
    model and of seasonal naive (the per-series mean over the cutoffs), the first six values
    of the forecast written."""
    p = Page(page[1])
    rows, cells = p.tables["forecasts"], p.cells["forecasts"]
    assert rows[0] == ["id", "group", "published model", "MASE", "MASE seasonal naive",
                       "next values"]
    assert rows[1] == ["+1", "+2", "+3", "+4", "+5", "+6"]
    fc = batch.outcome.forecast.rows()
    ids = sorted(set(fc["unique_id"]))
    assert [r[0] for r in rows[2:]] == ids and len(ids) == 40
    metrics = concat_columns(batch.outcome.scored.backtest.metrics)
    mine = dict(zip(*htmlreport.per_series_mase(metrics, "gru_direct"), strict=True))
    base = dict(zip(*htmlreport.per_series_mase(metrics, "seasonal_naive"), strict=True))
    for row, attrs in zip(rows[2:], cells[2:], strict=True):
        at = fc["unique_id"] == row[0]
        assert (row[1], row[2]) == (fc["group"][at][0], fc["model"][at][0])
        first = fc["y_hat"][at][np.argsort(fc["step"][at])][:6]
        assert [float(a["data-v"]) for a in attrs[5:]] == [float(v) for v in first]
        if row[2].startswith("fallback"):
            assert row[3:5] == ["–", "–"]      # skipped: never backtested
        else:
            assert row[3:5] == [f"{mine[row[0]]:.3f}", f"{base[row[0]]:.3f}"]
    assert sum(r[2] == "fallback:seasonal_naive" for r in rows[2:]) == \
        batch.outcome.forecast.n_fallback == 2


@pytest.mark.slow
def test_the_header_says_the_dates_and_what_was_published_and_why(page):
    header = Page(page[1]).header
    assert header["data"].endswith("data end 2024-06-30 23:00")       # not 20240630T230000
    assert header["horizon"] == "24 steps ahead: 2024-07-01 00:00 to 2024-07-01 23:00"
    assert header["published"] == ("gru_direct for all 4 groups — evaluate.select: network "
                                   "(gru_direct is published whatever its backtest)")


@pytest.mark.slow
def test_the_csv_link_holds_the_forecast_rows(batch, page):
    (link,) = [a for a in Page(page[1]).links if a.get("id") == "csv"]
    assert link["download"] == "forecasts.csv"
    head, data = link["href"].split(",", 1)
    assert head == "data:text/csv;base64"
    csv = pl.read_csv(io.BytesIO(base64.b64decode(data)), infer_schema=False)
    assert csv.columns == ["unique_id", "group", "ds", "model", "y_hat", "q_0.1", "q_0.5",
                           "q_0.9"]
    fc = batch.outcome.forecast.rows()
    order = np.lexsort((fc["step"], fc["unique_id"]))
    assert csv["unique_id"].to_list() == list(fc["unique_id"][order])
    assert csv["ds"].to_list() == list(np.datetime_as_string(fc["ds"][order], unit="s"))
    assert csv["model"].to_list() == list(fc["model"][order])
    assert csv["group"].to_list() == list(fc["group"][order])
    for col in ("y_hat", "q_0.1", "q_0.9"):
        np.testing.assert_array_equal(csv[col].cast(pl.Float32).to_numpy(),
                                      fc[col][order].astype(np.float32))


@pytest.mark.slow
def test_fallback_series_are_listed_with_their_reason_and_drawn(batch, page):
    p = Page(page[1])
    report = batch.outcome.data.report.filter(pl.col("action") == "skipped")
    want = [[r["series"], "fallback:seasonal_naive", f"skipped, {r['issue']}: {r['detail']}"]
            for r in report.sort("series").iter_rows(named=True)]
    assert [[r[0], r[2], r[3]] for r in p.tables["fallbacks"][1:]] == want
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", page[1])
    drawn = [c for c in captions if "; fallback: skipped, too_short: " in c]
    assert len(drawn) == 2 and len(captions) == 6        # a third of the places


# ------------------------------------------------------------------ hostile data, partial

def test_escaping_function():
    assert htmlreport.esc(HOSTILE[0]) == "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert htmlreport.esc(HOSTILE[2]) == "a&amp;b &quot;q&quot; &#x27;s&#x27;"


def test_hostile_ids_and_groups_are_text_not_markup(tmp_path):
    b = hostile_batch()
    text = htmlreport.render(b, b.outcome)
    p = Page(text)
    assert set(p.tags) <= TAGS and p.scripts == [htmlreport.SCRIPT]
    assert all(set(i) == {"src", "alt"} and i["src"].startswith("data:image/png;base64,")
               for i in p.images)
    for raw in [*HOSTILE[:3], "<b>North</b>", "<flow>"]:
        assert raw not in text and htmlreport.esc(raw) in text
    captions = text.split("<figcaption>")[1:]
    assert len(captions) == 5 and len(p.images) == 1 + 5
    assert [r[0] for r in p.tables["groups"][1:]] == ["<b>North</b>", "East & West", "x"]
    assert [r[0] for r in p.tables["leaderboard"][1:]] == ["naive", "seasonal_naive"]
    assert [r[0] for r in p.tables["forecasts"][2:]] == sorted(HOSTILE)      # text, sorted
    assert {r[1] for r in p.tables["forecasts"][2:]} == {"<b>North</b>", "East & West", "x"}


def test_the_csp_allows_the_pages_one_script_by_its_hash_and_nothing_else():
    b = hostile_batch()
    p = Page(htmlreport.render(b, b.outcome))
    (script,) = p.scripts
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
    rules = dict(r.strip().split(" ", 1) for r in p.csp.split(";"))
    assert rules == {"default-src": "'none'", "img-src": "data:",
                     "style-src": "'unsafe-inline'", "script-src": f"'sha256-{digest}'"}
    assert "innerHTML" not in script and "eval" not in script    # text stays text


def test_fallbacks_are_listed_with_why_and_the_sample_draws_them():
    b = hostile_batch("evaluate.plots=3")
    p = Page(htmlreport.render(b, b.outcome))
    why = {r[0]: r[3] for r in p.tables["fallbacks"][1:]}
    assert set(why) == set(HOSTILE)             # no model was trained: all fell back
    assert why[HOSTILE[0]] == "skipped, too_short: 1 < 2"         # the validation report's
    assert why["plain"] == "no model forecast for the series"
    forecasts = {"unique_id": np.repeat(["a", "b", "c", "d", "e"], 2),
                 "model": np.repeat(["m", "fallback:x", "m", "fallback:x", "m"], 2)}
    assert plots.choose(forecasts, 3) == ["a", "c", "b"]       # a third: fallbacks
    assert plots.choose(forecasts, 6) == ["a", "c", "e", "b", "d"]
    assert plots.choose(forecasts, 1) == ["a"]
    assert plots.choose({k: v[v != "m"] if k == "model" else v[forecasts["model"] != "m"]
                         for k, v in forecasts.items()}, 2) == ["b", "d"]


def test_a_promotion_says_per_group_what_was_decided():
    """After a promotion the forecast is the champions': the header gives each group's
    decision, the table no per-series MASE of a model this run did not score."""
    from pipeline.tracking.champions import Decision
    b = hostile_batch()
    cols = b.outcome.forecast.cols
    cols["model"] = np.where(cols["unique_id"] == "plain", "net", cols["model"]).astype(object)
    b.outcome.decisions = [Decision("x", 0.9, None, "none", True, challenger_model="auto_ets"),
                           Decision("<b>North</b>", 1.2, 1.1, "net v3", False)]
    p = Page(htmlreport.render(b, b.outcome))
    published = p.header["published"].split("; ")
    assert "x: net — promoted now, no valid champion before: this run's auto_ets, backtest " \
           "MASE 0.900" in published
    assert "<b>North</b>: fallback:seasonal_naive only" in published
    assert p.tables["forecasts"][0][:4] == ["id", "group", "published model",
                                            "MASE seasonal naive"]


def test_data_unit_labels_the_axes_and_the_value_columns(monkeypatch):
    figs = []
    real = plots._png
    monkeypatch.setattr(plots, "_png", lambda fig: figs.append(fig) or real(fig))
    b = hostile_batch("data.unit=kWh", "evaluate.plots=1")
    p = Page(htmlreport.render(b, b.outcome))
    assert p.tables["forecasts"][0][-1] == "next values (kWh)"
    assert p.tables["leaderboard"][0][1:3] == ["mae (kWh)", "rmse (kWh)"]
    assert figs[-1].axes[0].get_ylabel() == "kWh"
    text = htmlreport.render(b, b.outcome)
    assert "average miss in kWh" in text and "values in kWh" in text
    b = hostile_batch("data.target_col=load", "evaluate.plots=1")
    p = Page(htmlreport.render(b, b.outcome))
    assert p.tables["forecasts"][0][-1] == "next values"
    assert p.tables["leaderboard"][0][1:3] == ["mae", "rmse"]
    assert figs[-1].axes[0].get_ylabel() == "load"          # the target's name, not `y`


def test_large_runs_cap_the_table_and_the_csv(monkeypatch):
    b = hostile_batch()
    monkeypatch.setattr(html_series, "SERIES_ROWS", 2)
    monkeypatch.setattr(html_series, "CSV_BYTES", 100)
    text = htmlreport.render(b, b.outcome)
    p = Page(text)
    assert len(p.tables["forecasts"]) == 2 + 2
    assert "Showing the 2 series of highest backtest MASE of 5" in text
    assert not [a for a in p.links if a.get("id") == "csv"]
    assert re.search(r"all of it in the forecast output \(its CSV would be [\d.]+ MiB\)",
                     p.header["forecast"])


@pytest.mark.parametrize("freq, kind, ordinal, want", [
    ("1h", "datetime", 0, "1970-01-01 00:00"),
    ("15min", "datetime", 3_600_000_000_000 * 24 * 19905 + 900_000_000_000, "2024-07-01 00:15"),
    ("1d", "date", 19905, "2024-07-01"),
    ("1w-mon", "datetime", 19905, "2024-07-01"),
    ("1mo", "datetime", 54 * 12 + 5, "June 2024"),
    ("1mo-end", "date", 54 * 12 + 5, "June 2024"),
    ("1q", "datetime", 54 * 12 + 3, "2024 Q2"),
    ("1y", "datetime", 54 * 12, "2024"),
    ("1", "int", 812, "step 812"),
])
def test_steps_read_as_dates(freq, kind, ordinal, want):
    import dataclasses

    from pipeline.data.calendar import parse_freq
    f = dataclasses.replace(parse_freq(freq), kind=kind)
    if f.unit == "M":
        f = dataclasses.replace(f, month_end=freq.endswith("-end"))
    assert htmlreport.when(ordinal, f) == want
    berlin = dataclasses.replace(parse_freq("1h"), tz="Europe/Berlin")
    assert htmlreport.when(0, berlin) == "1970-01-01 01:00 (Europe/Berlin)"


def test_no_histogram_label_is_cut_off(monkeypatch):
    """Finding: the skill panel's label ran past the figure's right edge (a long model name)."""
    seen = []
    real = plots._png

    def look(fig):
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        seen.extend((t.get_text(), t.get_window_extent(r), fig.bbox) for ax in fig.axes
                    for t in (ax.xaxis.label, ax.yaxis.label, ax.title,
                              *(ax.get_legend().get_texts() if ax.get_legend() else ()))
                    if t.get_text())
        return real(fig)
    monkeypatch.setattr(plots, "_png", look)
    rng = np.random.default_rng(0)
    png = plots.error_histograms("a_rather_long_model_name_direct", rng.gamma(2, size=50),
                                 rng.gamma(2, size=50), rng.normal(size=50))
    assert len(seen) == 6          # x and y labels of both panels, the legend's two
    for text, e, box in seen:
        assert box.x0 <= e.x0 and e.x1 <= box.x1 and box.y0 <= e.y0 and e.y1 <= box.y1, text
    assert png.startswith(b"\x89PNG")


def test_a_prepare_batch_renders_its_sections_only(tmp_path):
    b = hostile_batch()
    path = htmlreport.write(b, Outcome(b.outcome.data), str(tmp_path / "prepare.html"))
    p = Page(pathlib.Path(path).read_text(encoding="utf-8"))
    assert set(p.tables) == {"validation"} and p.images == []


# ----------------------------------------------------------------- a real headless browser

def chrome(tmp_path):
    """Debian's Chromium through its chromedriver (Selenium), offline, a fresh profile."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        missing(f"{CHROMIUM} or {CHROMEDRIVER} is missing (apt-get install -y chromium "
                "chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing("selenium is not installed (pip install -e '.[dev]')")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=opts, service=service)
    driver.set_page_load_timeout(60)
    return driver


def _images(driver) -> list:
    return driver.execute_script(
        "return Array.from(document.images).map(i => [i.complete, i.naturalWidth]);")


def _shown(driver) -> list[list[str]]:
    """The per-series table's rows the browser shows, in order: each cell's text and, for
    numeric cells, its `data-v`."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('table#forecasts tbody tr'))"
        ".filter(r => !r.hidden).map(r => Array.from(r.cells).map("
        "c => c.classList.contains('num') ? c.getAttribute('data-v') : c.textContent));")


def _key(v: str) -> float:
    return float(v) if v else float("inf")       # blanks ('–') sort last either way


@pytest.mark.slow
def test_the_page_renders_in_headless_chromium(batch, page, tmp_path):
    from selenium.webdriver.common.by import By
    driver = chrome(tmp_path)
    try:
        driver.get("file://" + os.path.abspath(page[0]))
        rows = driver.find_elements(By.CSS_SELECTOR, "table#leaderboard tbody tr")
        assert [r.find_element(By.TAG_NAME, "td").text for r in rows] == [
            "gru_direct", "auto_theta", "naive", "seasonal_naive"]
        images = _images(driver)
        assert len(images) == 7 and all(ok and width > 0 for ok, width in images), images
        header = dict(driver.execute_script(
            "return Array.from(document.querySelectorAll('header dt')).map("
            "d => [d.textContent, d.nextElementSibling.textContent]);"))
        assert header["data"] == "40 series (38 usable), frequency 1h, data end 2024-06-30 23:00"
        assert header["horizon"] == "24 steps ahead: 2024-07-01 00:00 to 2024-07-01 23:00"
        assert header["published"].startswith("gru_direct for all 4 groups — evaluate.select: "
                                              "network")
        assert driver.find_element(By.ID, "csv").get_attribute("download") == "forecasts.csv"
        fc = batch.outcome.forecast.rows()
        first = fc["step"] == 1
        want = dict(zip(fc["unique_id"][first], fc["y_hat"][first].astype(float), strict=True))
        rows = _shown(driver)
        assert [r[0] for r in rows] == sorted(want) and len(rows) == 40     # as written
        assert all(float(r[5]) == want[r[0]] for r in rows)                 # +1: the forecast
        assert [r[2] for r in rows].count("fallback:seasonal_naive") == 2
        texts = [r.find_elements(By.TAG_NAME, "td")[5].text for r in driver.find_elements(
            By.CSS_SELECTOR, "table#forecasts tbody tr")]
        assert texts == [r[5] for r in Page(page[1]).tables["forecasts"][2:]]
        plus1 = driver.find_element(By.CSS_SELECTOR, "table#forecasts th[data-col='5']")
        plus1.click()                                  # the script sorts: ascending, then down
        assert [_key(r[5]) for r in _shown(driver)] == sorted(_key(r[5]) for r in rows)
        assert plus1.get_attribute("aria-sort") == "ascending"
        plus1.click()
        assert [_key(r[5]) for r in _shown(driver)] == sorted((_key(r[5]) for r in rows),
                                                             reverse=True)
        mase = driver.find_element(By.CSS_SELECTOR, "table#forecasts th[data-col='3']")
        mase.click()
        got = [r[3] for r in _shown(driver)]
        assert got[-2:] == ["", ""] and [float(v) for v in got[:-2]] == sorted(
            float(r[3]) for r in rows if r[3])      # the fallbacks' blank MASE last
        driver.find_element(By.CSS_SELECTOR, "table#forecasts th[data-col='0']").click()
        assert [r[0] for r in _shown(driver)] == sorted(want)
        box = driver.find_element(By.ID, "forecasts-filter")   # the script made it
        box.send_keys("store_b")
        shown = _shown(driver)
        assert shown and {r[1] for r in shown} == {"store_B"}
        assert len(shown) == len(set(fc["unique_id"][fc["group"] == "store_B"]))
        box.clear()
        box.send_keys("S0003")
        assert [r[0] for r in _shown(driver)] == ["S0003"]
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1280, height + 40)
        assert driver.save_screenshot(str(tmp_path / "report.png"))
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
        hostile = tmp_path / "hostile.html"
        b = hostile_batch()
        htmlreport.write(b, b.outcome, str(hostile))
        driver.get("file://" + str(hostile))
        (script,) = driver.find_elements(By.TAG_NAME, "script")     # ours alone, and it ran
        assert script.get_attribute("innerHTML") == htmlreport.SCRIPT
        assert driver.find_elements(By.ID, "forecasts-filter")
        assert HOSTILE[0] in driver.find_element(By.ID, "series").text
        assert sorted(r[0] for r in _shown(driver)) == sorted(HOSTILE)
        assert all(ok and width > 0 for ok, width in _images(driver))
        assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []
    finally:
        driver.quit()


def test_the_backtest_line_is_one_model_and_every_other_model_a_line_of_its_own():
    """Once, with the combination on, the line labelled `backtest (cnn_direct)` joined the
    network's rows and the combination's into one polyline. Now the backtest line is the
    published model's (else the network's) and each other model at that cutoff is its own."""
    from pipeline.data.calendar import Freq
    rows = [(m, c, s) for c in (0, 24) for m in ("cnn_direct", "combination", "auto_ets",
                                                 "seasonal_naive") for s in range(1, 4)]
    cols = {"unique_id": np.array(["a"] * len(rows)), "model": np.array([r[0] for r in rows]),
            "cutoff": np.array([r[1] for r in rows]),
            "ds": np.array([r[1] + r[2] for r in rows]),
            "y_hat": np.arange(len(rows), dtype=np.float32)}
    freq = Freq("int", 1, kind="int")
    for published, line in ((None, "cnn_direct"), ("combination", "combination"),
                            ("fallback:seasonal_naive", "cnn_direct")):
        bt, others = plots.latest_backtest(cols, "a", (), freq, published)
        assert bt["model"] == line and len(bt["ds"]) == 3 and list(bt["ds"]) == [25, 26, 27]
        assert sorted(others) == sorted({"cnn_direct", "combination", "auto_ets",
                                         "seasonal_naive"} - {line})
        assert all(len(o["ds"]) == 3 for o in others.values())
