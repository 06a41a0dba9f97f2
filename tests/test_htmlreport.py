"""The batch's HTML page (pipeline.outputs.html): built from a real small run, checked as HTML,
against hostile series ids and group values, and rendered in a real headless Chromium."""
from __future__ import annotations

import base64
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
from pipeline.outputs import plots
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
        "li", "code", "img", "figure", "figcaption", "span"}


class Page(HTMLParser):
    """The parts of a page the tests look at: tags, images, and each table's cell texts."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags, self.images, self.tables = [], [], {}
        self._table = self._row = None
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        elif tag == "table":
            self._table = self.tables.setdefault(attrs.get("id"), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


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


def hostile_batch() -> SimpleNamespace:
    """A batch-shaped object whose series ids and group values are markup: baselines-only
    backtest, fallback forecasts, a skipped series in the report."""
    cfg = C.load(None, ["windows.lookback=24", "windows.horizon=6", "data.calendar=[]",
                        "evaluate.plots=5", "evaluate.comparators=[]"])
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
    assert set(p.tags) <= TAGS and "script" not in p.tags
    pngs = [base64.b64decode(i["src"].split(",", 1)[1]) for i in p.images]
    assert all(i["src"].startswith("data:image/png;base64,") for i in p.images)
    assert all(b.startswith(b"\x89PNG\r\n\x1a\n") and len(b) > 5000 for b in pngs)
    assert len(pngs) == 1 + 6            # the error histograms and evaluate.plots series
    assert "http://" not in text and "https://" not in text
    groups = p.tables["groups"]
    assert [r[0] for r in groups[1:]] == ["store_A", "store_B", "store_C", "store_D"]
    counts = {(r[0], r[1]): int(r[2]) for r in p.tables["validation"][1:]}
    assert counts[("too_short", "skipped")] == 2
    assert "S0001" in text and batch.run_id in text
    assert re.search(r"\d+ series, frequency 1h, last step \d{4}-\d\d-\d\d \d\d:00:00; "
                     r"24 steps ahead", text)
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


# ------------------------------------------------------------------ hostile data, partial

def test_escaping_function():
    assert htmlreport.esc(HOSTILE[0]) == "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert htmlreport.esc(HOSTILE[2]) == "a&amp;b &quot;q&quot; &#x27;s&#x27;"


def test_hostile_ids_and_groups_are_text_not_markup(tmp_path):
    b = hostile_batch()
    text = htmlreport.render(b, b.outcome)
    p = Page(text)
    assert set(p.tags) <= TAGS and "script" not in p.tags
    assert all(set(i) == {"src", "alt"} and i["src"].startswith("data:image/png;base64,")
               for i in p.images)
    for raw in [*HOSTILE[:3], "<b>North</b>", "<flow>"]:
        assert raw not in text and htmlreport.esc(raw) in text
    captions = text.split("<figcaption>")[1:]
    assert len(captions) == 5 and len(p.images) == 1 + 5
    assert [r[0] for r in p.tables["groups"][1:]] == ["<b>North</b>", "East & West", "x"]
    assert [r[0] for r in p.tables["leaderboard"][1:]] == ["naive", "seasonal_naive"]


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
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1280, height + 40)
        assert driver.save_screenshot(str(tmp_path / "report.png"))
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
        hostile = tmp_path / "hostile.html"
        b = hostile_batch()
        htmlreport.write(b, b.outcome, str(hostile))
        driver.get("file://" + str(hostile))
        assert driver.find_elements(By.TAG_NAME, "script") == []
        assert HOSTILE[0] in driver.find_element(By.ID, "series").text
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
