"""Render a Grafana dashboard's queries to one PNG with matplotlib: not Grafana, the same
PromQL against the same data, for a screenshot where no Grafana server is at hand.

How to:

    # Any Prometheus that scrapes one or more workers' /metrics, e.g. a throw-away one:
    #   prometheus --config.file=prom.yml --storage.tsdb.path="$(mktemp -d)" \
    #     --web.listen-address=127.0.0.1:9090
    python deploy/monitoring/render_dashboard.py --prometheus http://127.0.0.1:9090 \
        --last 10m --out docs/dashboard.png
    # bench/dashboard_demo.py runs the simulator, a Pub/Sub emulator, workers and
    # Prometheus, then calls this with the exact time range of the run.

For every panel of the dashboard JSON (default: grafana-dashboard.json next to this file)
it runs each target's ``expr`` through Prometheus' ``/api/v1/query_range`` and draws the
series in the panel's grid position, titled and labelled (``legendFormat``) as Grafana
would. Template variables take their "All" value (``allValue``) or their default, unless
given with ``--var name=value``; ``$__rate_interval`` is Grafana's
max(step + scrape interval, 4 x scrape interval) unless ``--rate-interval`` says otherwise.
Only ``timeseries`` panels are drawn. Needs matplotlib (the ``chart`` extra).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
GRID_COLUMNS = 24
COLORS = (
    "#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2",
    "#b877d9", "#ffa6b0", "#37872d", "#fade2a",
)  # fmt: skip
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration like 30s, 10m or 1h: {text!r}")
    return float(m.group(1)) * UNITS[m.group(2)]


def prom_duration(seconds: float) -> str:
    return f"{max(1, round(seconds))}s"


def variables(dashboard: dict[str, Any], given: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for var in dashboard.get("templating", {}).get("list", []):
        name = var["name"]
        if name in given:
            out[name] = given[name]
        elif var.get("includeAll"):
            out[name] = var.get("allValue") or ".*"
        else:
            current = var.get("current", {}).get("value") or var.get("query") or ""
            out[name] = current if isinstance(current, str) else ".*"
    out.update(given)
    return out


def substitute(expr: str, values: dict[str, str], rate_interval: str, step: str) -> str:
    expr = expr.replace("$__rate_interval", rate_interval).replace("$__interval", step)
    # Longest names first, so $ns does not eat the start of $namespace.
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    return expr


def query_range(
    prometheus: str, expr: str, start: float, end: float, step: float
) -> list[dict[str, Any]]:
    params = urllib.parse.urlencode(
        {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
    )
    url = f"{prometheus.rstrip('/')}/api/v1/query_range?{params}"
    with urllib.request.urlopen(url, timeout=30) as response:
        body = json.load(response)
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body.get('error', body)}")
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def legend(fmt: str, labels: dict[str, str]) -> str:
    if not fmt or fmt == "__auto":
        inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__")
        return labels.get("__name__", "") + (f"{{{inner}}}" if inner else "")
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)


def _formatter(unit: str) -> Any:
    from matplotlib.ticker import FuncFormatter

    def short(v: float) -> str:
        a = abs(v)
        if a >= 1e6:
            return f"{v / 1e6:.3g}M"
        if a >= 1e3:
            return f"{v / 1e3:.3g}k"
        return f"{v:.3g}"

    def fmt(v: float, _pos: int) -> str:
        if unit == "percentunit":
            return f"{v * 100:.0f}%"
        if unit == "s":
            return f"{v * 1000:.3g} ms" if 0 < abs(v) < 1 else f"{short(v)} s"
        if unit == "currencyUSD":
            return f"${v:.3g}"
        return short(v)

    return FuncFormatter(fmt)


def render(
    dashboard: dict[str, Any],
    prometheus: str,
    start: float,
    end: float,
    out: Path,
    *,
    given: dict[str, str],
    scrape_interval_s: float,
    rate_interval_s: float | None,
    width_in: float,
    dpi: int,
    subtitle: str,
) -> tuple[int, int]:
    """Draw the PNG; (panels with data, panels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    dashboard = dashboard.get("dashboard", dashboard)
    panels = [p for p in _flatten(dashboard.get("panels", [])) if p.get("type") == "timeseries"]
    if not panels:
        raise SystemExit("no timeseries panels in the dashboard")
    step = max(scrape_interval_s, math.ceil((end - start) / 300))
    rate = rate_interval_s or max(step + scrape_interval_s, 4 * scrape_interval_s)
    values = variables(dashboard, given)
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    # Grafana's grid: 24 columns across, rows of 30 px, about 0.45 of a column.
    row_in = width_in / GRID_COLUMNS * 0.45
    header_in = 0.8
    height_in = rows * row_in + header_in
    plt.style.use("dark_background")
    fig = plt.figure(figsize=(width_in, height_in), dpi=dpi, facecolor="#111217")
    grid = fig.add_gridspec(
        rows, GRID_COLUMNS, left=0.005, right=0.995, top=1 - header_in / height_in,
        bottom=0.0, hspace=0.0, wspace=0.0,
    )  # fmt: skip
    drawn = 0
    for panel in panels:
        g = panel["gridPos"]
        # The panel's first row holds its title, its last the time axis, its first column
        # the value axis.
        ax = fig.add_subplot(grid[g["y"] + 1 : g["y"] + g["h"] - 1, g["x"] + 1 : g["x"] + g["w"]])
        ax.set_facecolor("#181b1f")
        ax.set_title(panel["title"], fontsize=10, loc="left", color="#ccccdc", pad=6)
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        series = 0
        for target in panel.get("targets", []):
            expr = substitute(target["expr"], values, prom_duration(rate), prom_duration(step))
            try:
                result = query_range(prometheus, expr, start, end, step)
            except Exception as exc:  # shown in the panel, like Grafana's error corner
                ax.text(0.02, 0.5, f"query error: {exc}"[:120], fontsize=6, color="#f2495c")
                continue
            for item in result:
                points = [(float(t), float(v)) for t, v in item["values"]]
                xs = [datetime.fromtimestamp(t) for t, v in points if math.isfinite(v)]
                ys = [v for _, v in points if math.isfinite(v)]
                if not xs:
                    continue
                color = COLORS[series % len(COLORS)]
                ax.plot(
                    xs,
                    ys,
                    lw=1.1,
                    color=color,
                    label=legend(target.get("legendFormat", ""), item["metric"]),
                )
                ax.fill_between(xs, ys, alpha=0.08, color=color)
                series += 1
        if series:
            drawn += 1
            ax.legend(
                fontsize=7, loc="upper left", labelcolor="#ccccdc", facecolor="#181b1f",
                edgecolor="none", framealpha=0.7, handlelength=1.2, borderaxespad=0.3,
            )  # fmt: skip
        else:
            ax.text(
                0.5,
                0.5,
                "No data",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="#8e8e8e",
            )
        defaults = panel.get("fieldConfig", {}).get("defaults", {})
        if "min" in defaults:
            ax.set_ylim(bottom=defaults["min"])
        if "max" in defaults:
            ax.set_ylim(top=defaults["max"] * 1.05)
        ax.yaxis.set_major_formatter(_formatter(unit))
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M"))
        ax.tick_params(labelsize=7, colors="#8e8e8e")
        ax.grid(color="#2c3235", lw=0.5)
        for spine in ax.spines.values():
            spine.set_visible(False)
    fig.text(0.01, 1 - 0.3 / height_in, dashboard.get("title", ""), fontsize=14, color="#ccccdc")
    fig.text(0.01, 1 - 0.6 / height_in, subtitle, fontsize=9, color="#8e8e8e")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, facecolor=fig.get_facecolor())
    plt.close(fig)
    _shrink(out)
    return drawn, len(panels)


def _flatten(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in panels:
        if p.get("type") == "row":
            out.extend(_flatten(p.get("panels", [])))
        else:
            out.append(p)
    return out


def _shrink(path: Path) -> None:
    """A palette PNG: a fraction of the size, indistinguishable for line charts."""
    from PIL import Image

    with Image.open(path) as img:
        small = img.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prometheus", required=True, help="base URL, e.g. http://127.0.0.1:9090")
    p.add_argument("--dashboard", type=Path, default=HERE / "grafana-dashboard.json")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    span = p.add_mutually_exclusive_group()
    span.add_argument("--last", type=parse_duration, default=600.0, help="e.g. 10m (default)")
    span.add_argument("--start", type=float, help="epoch seconds (with --end)")
    p.add_argument("--end", type=float, help="epoch seconds (default: now)")
    p.add_argument("--var", action="append", default=[], help="template variable: name=value")
    p.add_argument("--scrape-interval", type=parse_duration, default=15.0)
    p.add_argument("--rate-interval", type=parse_duration, help="override $__rate_interval")
    p.add_argument("--width", type=float, default=20.0, help="inches (default 20)")
    p.add_argument("--dpi", type=int, default=80)
    p.add_argument(
        "--subtitle",
        default="The dashboard's PromQL rendered with matplotlib from Prometheus (not Grafana).",
    )
    args = p.parse_args(argv)
    end = args.end if args.end is not None else time.time()
    start = args.start if args.start is not None else end - args.last
    given = dict(v.split("=", 1) for v in args.var)
    drawn, total = render(
        json.loads(args.dashboard.read_text()),
        args.prometheus,
        start,
        end,
        args.out,
        given=given,
        scrape_interval_s=args.scrape_interval,
        rate_interval_s=args.rate_interval,
        width_in=args.width,
        dpi=args.dpi,
        subtitle=args.subtitle,
    )
    print(f"{args.out}: {drawn} of {total} panels with data, {args.out.stat().st_size} bytes")
    return 0 if drawn else 4


if __name__ == "__main__":
    sys.exit(main())
