"""The HTML page's parts every section uses: escaping, numbers, tables, images, dates, the
style sheet and the one inline script with the Content-Security-Policy that allows it by its
SHA-256 (`pipeline.outputs.html` assembles the page)."""
from __future__ import annotations

import base64
import hashlib
import html
import math

import numpy as np

from pipeline.data import grid

CSV_ROW_BYTES = 40         # a CSV row's least size: more rows than CSV_BYTES / this: no CSV


MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]


CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: .2em; } h2 { font-size: 1.2em; margin-top: 1.6em;
  border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { padding: .25em .7em; border-bottom: 1px solid #e4e4e4; text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.model td { font-weight: 600; } td.best { background: #e6f4e6; }
dl { display: grid; grid-template-columns: max-content auto; gap: .15em 1em; }
dt { color: #666; } dd { margin: 0; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; }
figcaption, .note { color: #666; font-size: .9em; } .bad { color: #b00020; }
th[data-col] { cursor: pointer; } th[aria-sort=ascending]::after { content: " \\25B2"; }
th[aria-sort=descending]::after { content: " \\25BC"; }
#forecasts-filter { margin: .3em 0; padding: .2em .4em; width: 20em; }
"""


SCRIPT = """(function () {
  "use strict";
  var table = document.getElementById("forecasts");
  if (!table) { return; }
  var body = table.tBodies[0], heads = table.querySelectorAll("th[data-col]");
  var rows = Array.prototype.slice.call(body.rows);
  function key(row, col, numeric) {
    var cell = row.cells[col];
    if (!numeric) { return cell.textContent; }
    var v = parseFloat(cell.getAttribute("data-v"));
    return isNaN(v) ? null : v;
  }
  Array.prototype.forEach.call(heads, function (th) {
    th.title = "sort by this column";
    th.addEventListener("click", function () {
      var col = Number(th.getAttribute("data-col")), numeric = th.classList.contains("num");
      var up = th.getAttribute("aria-sort") !== "ascending";
      Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", up ? "ascending" : "descending");
      rows.sort(function (a, b) {
        var x = key(a, col, numeric), y = key(b, col, numeric);
        if (x === y) { return 0; }
        if (x === null) { return 1; }
        if (y === null) { return -1; }
        var c = numeric ? x - y : x.localeCompare(y);
        return up ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
  var box = document.createElement("input"), count = document.createElement("span");
  box.type = "search";
  box.id = "forecasts-filter";
  box.placeholder = "filter by id, group or model";
  box.setAttribute("aria-label", "filter the series");
  count.className = "note";
  box.addEventListener("input", function () {
    var q = box.value.toLowerCase(), shown = 0;
    rows.forEach(function (r) {
      var text = "";
      Array.prototype.forEach.call(r.cells, function (c) {
        if (!c.classList.contains("num")) { text += c.textContent.toLowerCase() + " "; }
      });
      r.hidden = text.indexOf(q) < 0;
      shown += r.hidden ? 0 : 1;
    });
    count.textContent = q ? " " + shown + " of " + rows.length + " rows" : "";
  });
  table.parentNode.insertBefore(box, table);
  table.parentNode.insertBefore(count, table);
}());
"""


def script_source(script: str = SCRIPT) -> str:
    """The CSP source that allows the inline `script` and no other: 'sha256-<base64>'."""
    digest = hashlib.sha256(script.encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode('ascii')}'"


def csp(script: str = SCRIPT) -> str:
    """Nothing fetched; images from data: URIs, the inline style, the one inline script."""
    return ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
            f"script-src {script_source(script)}")


def esc(value) -> str:
    """Text from the data or the config, escaped for HTML text and attribute values."""
    return html.escape(str(value), quote=True)


def _img(png: bytes, alt: str) -> str:
    return (f"<img src=\"data:image/png;base64,{base64.b64encode(png).decode('ascii')}\" "
            f"alt=\"{esc(alt)}\">")


def _num(v, digits: int = 4) -> str:
    return f"{v:.{digits}f}" if v is not None and math.isfinite(v) else "–"


def _table(table_id: str, head: list[str], rows: list[str]) -> str:
    """A table of pre-rendered <tr> rows; numeric columns are those whose head starts '#'."""
    cells = "".join(f"<th class=\"num\">{esc(h[1:])}</th>" if h.startswith("#") else
                    f"<th>{esc(h)}</th>" for h in head)
    return (f"<table id=\"{table_id}\"><thead><tr>{cells}</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def when(ordinal: int, freq) -> str:
    """A step of the grid as a planner reads it: '2024-06-30 23:00' (sub-daily), '2024-06-30'
    (days, business days, weeks), 'June 2024' (months), '2024 Q2' (calendar quarters),
    '2024' (calendar years), 'step 812' (integer steps); the zone after tz-aware times."""
    if freq.unit == "int":
        return f"step {int(ordinal)}"
    t = grid.to_arrow(np.array([int(ordinal)]), freq)[0].as_py()
    zone = f" ({freq.tz})" if freq.tz else ""
    if freq.unit == "M":
        first = (t.month - 1) % 3 == 0 if not freq.month_end else t.month % 3 == 0
        if freq.step % 12 == 0 and t.month == (12 if freq.month_end else 1):
            return str(t.year)
        if freq.step % 3 == 0 and first:
            return f"{t.year} Q{(t.month - 1) // 3 + 1}"
        return f"{MONTHS[t.month - 1]} {t.year}"
    if freq.unit in ("D", "B"):
        text = f"{t.year:04d}-{t.month:02d}-{t.day:02d}"
        return text + (f" {t.hour:02d}:{t.minute:02d}{zone}" if freq.time_ns else "")
    return (f"{t.year:04d}-{t.month:02d}-{t.day:02d} {t.hour:02d}:{t.minute:02d}"
            + (f":{t.second:02d}" if t.second or freq.step % 60_000_000_000 else "") + zone)


def _values_note(unit: str | None) -> str:
    return f"values in {esc(unit)}" if unit else "values in the target's units"


def _num_cell(v, digits: int | None = None) -> str:
    """A numeric cell: the value for reading, its full value in `data-v` for sorting."""
    ok = v is not None and math.isfinite(v)
    text = (_num(v, digits) if digits is not None else _value(v)) if ok else "–"
    return f"<td class=\"num\" data-v=\"{float(v)!r}\">{text}</td>" if ok else \
        f"<td class=\"num\" data-v=\"\">{text}</td>"


def _value(v: float) -> str:
    """A forecast value to read: about four significant digits, thousands separated."""
    a = abs(v)
    digits = 0 if a >= 1000 else 1 if a >= 100 else 2 if a >= 1 else 4
    return f"{v:,.{digits}f}"
