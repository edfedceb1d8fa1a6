//! The `ingest` benchmark's cost curve: its runs at several site counts drawn as one SVG
//! (written by hand), four panels against the number of sites — CPU per report, memory per
//! site, report-to-API visibility (p99), reconnection after a restart — each with its target
//! at 20,000 sites as a dashed line. The runs come from the bench itself or from its summary
//! lines in a saved log ([`parse_log`]).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, bail};

use crate::ingest::Figures;

/// How a summary line starts.
pub const PREFIX: &str = "ingest sites=";

/// The site count the targets are set for.
const TARGET_SITES: f64 = 20_000.0;

/// One panel: a figure of a run against its site count.
struct Panel {
    title: &'static str,
    unit: &'static str,
    /// The figure, if the run has one (a p99 of -1 means no report event arrived).
    value: fn(&Figures) -> Option<f64>,
    target: f64,
    /// Decimals of the values printed next to the points.
    decimals: usize,
}

const PANELS: [Panel; 4] = [
    Panel {
        title: "CPU per report",
        unit: "µs",
        value: |f| Some(f.cpu_us_per_report),
        target: 50.0,
        decimals: 1,
    },
    Panel {
        title: "Memory per site, peak RSS / sites",
        unit: "KB",
        value: |f| (f.sites > 0).then(|| f.rss_mb * 1024.0 / f.sites as f64),
        // 1 GB at 20,000 sites.
        target: 1024.0 * 1024.0 / TARGET_SITES,
        decimals: 1,
    },
    Panel {
        title: "Report visible in the API, p99",
        unit: "ms",
        value: |f| (f.p99_visible_ms >= 0).then_some(f.p99_visible_ms as f64),
        target: 500.0,
        decimals: 0,
    },
    Panel {
        title: "Reconnection after a controller restart",
        unit: "s",
        value: |f| Some(f.reconnect_s),
        target: 60.0,
        decimals: 1,
    },
];

/// The figures of a summary line; `None` for a line that is not one (it does not start with
/// [`PREFIX`] once leading blanks are removed), an error for one that is but does not parse.
/// Keys the line has beyond the nine are ignored.
pub fn parse_line(line: &str) -> Option<anyhow::Result<Figures>> {
    let line = line.trim();
    if !line.starts_with(PREFIX) {
        return None;
    }
    Some(parse_fields(line.strip_prefix("ingest ").unwrap_or(line)))
}

fn parse_fields(fields: &str) -> anyhow::Result<Figures> {
    let mut pairs = Vec::new();
    for word in fields.split_whitespace() {
        let (k, v) = word
            .split_once('=')
            .with_context(|| format!("`{word}` is not key=value"))?;
        pairs.push((k, v));
    }
    fn get<T: std::str::FromStr>(pairs: &[(&str, &str)], key: &str) -> anyhow::Result<T>
    where
        T::Err: std::fmt::Display,
    {
        let v = pairs
            .iter()
            .rev()
            .find(|(k, _)| *k == key)
            .with_context(|| format!("no {key}="))?
            .1;
        v.parse().map_err(|e| anyhow::anyhow!("{key}={v}: {e}"))
    }
    Ok(Figures {
        sites: get(&pairs, "sites")?,
        reports: get(&pairs, "reports")?,
        lost: get(&pairs, "lost")?,
        dup: get(&pairs, "dup")?,
        cpu_us_per_report: get(&pairs, "cpu_us_per_report")?,
        rss_mb: get(&pairs, "rss_mb")?,
        p99_visible_ms: get(&pairs, "p99_visible_ms")?,
        wire_bytes_per_report: get(&pairs, "wire_bytes_per_report")?,
        reconnect_s: get(&pairs, "reconnect_s")?,
    })
}

/// Every summary line of a log, in order; other lines are skipped. A summary line that does
/// not parse is an error naming its line number.
pub fn parse_log(text: &str) -> anyhow::Result<Vec<Figures>> {
    let mut runs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if let Some(figures) = parse_line(line) {
            runs.push(figures.with_context(|| format!("line {}: {}", i + 1, line.trim()))?);
        }
    }
    Ok(runs)
}

/// Reads the summary lines of the log at `from` (see [`parse_log`]).
pub fn read_log(from: &Path) -> anyhow::Result<Vec<Figures>> {
    let text = std::fs::read_to_string(from).with_context(|| from.display().to_string())?;
    let runs = parse_log(&text).with_context(|| from.display().to_string())?;
    if runs.is_empty() {
        bail!("{}: no line starts with `{PREFIX}`", from.display());
    }
    Ok(runs)
}

/// Writes the curve of `runs` to `path`.
pub fn write(path: &Path, runs: &[Figures]) -> anyhow::Result<()> {
    if runs.is_empty() {
        bail!("no runs to plot");
    }
    std::fs::write(path, svg(runs)).with_context(|| path.display().to_string())
}

// Layout, in SVG units.
const WIDTH: f64 = 1000.0;
const HEIGHT: f64 = 780.0;
const HEADER: f64 = 80.0;
const PANEL_W: f64 = WIDTH / 2.0;
const PANEL_H: f64 = (HEIGHT - HEADER) / 2.0;
// The plot area inside a panel.
const LEFT: f64 = 72.0;
const RIGHT: f64 = 28.0;
const TOP: f64 = 60.0;
const BOTTOM: f64 = 56.0;

/// The SVG: a title, then one panel per figure (2 × 2), each with axes, ticks, the runs'
/// points joined by one polyline in order of site count and labelled with their values, and
/// its target as a dashed horizontal line.
pub fn svg(runs: &[Figures]) -> String {
    let mut runs = runs.to_vec();
    runs.sort_by_key(|r| r.sites);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r##"<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>"##
    );
    let _ = writeln!(
        out,
        r#"<text x="{}" y="32" text-anchor="middle" font-size="20" font-weight="bold">{}</text>"#,
        WIDTH / 2.0,
        esc("Tiandi ingest: cost against the number of sites")
    );
    let counts: Vec<String> = runs.iter().map(|r| thousands(r.sites as f64)).collect();
    let _ = writeln!(
        out,
        r##"<text x="{}" y="56" text-anchor="middle" fill="#555555">{}</text>"##,
        WIDTH / 2.0,
        esc(&format!(
            "{} run{} ({} sites); dashed: the target at 20,000 sites",
            runs.len(),
            if runs.len() == 1 { "" } else { "s" },
            counts.join(", ")
        ))
    );
    let x_max = nice_ceil(
        runs.iter()
            .map(|r| r.sites as f64)
            .fold(TARGET_SITES, f64::max),
    );
    for (i, panel) in PANELS.iter().enumerate() {
        let ox = (i % 2) as f64 * PANEL_W;
        let oy = HEADER + (i / 2) as f64 * PANEL_H;
        draw_panel(&mut out, panel, &runs, ox, oy, x_max);
    }
    out.push_str("</svg>\n");
    out
}

fn draw_panel(out: &mut String, p: &Panel, runs: &[Figures], ox: f64, oy: f64, x_max: f64) {
    let points: Vec<(f64, f64)> = runs
        .iter()
        .filter_map(|r| Some((r.sites as f64, (p.value)(r)?)))
        .filter(|(_, v)| v.is_finite())
        .collect();
    let (x0, x1) = (ox + LEFT, ox + PANEL_W - RIGHT);
    let (y0, y1) = (oy + PANEL_H - BOTTOM, oy + TOP);
    // Room above the highest point or the target for its label.
    let top = points.iter().map(|&(_, v)| v).fold(p.target, f64::max) * 1.15;
    let y_step = nice_step(top / 5.0);
    let y_max = (top / y_step).ceil() * y_step;
    let x_step = nice_step(x_max / 5.0);
    let sx = |x: f64| x0 + (x1 - x0) * x / x_max;
    let sy = |y: f64| y0 - (y0 - y1) * y / y_max;

    let _ = writeln!(out, r#"<g class="panel">"#);
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="14" font-weight="bold">{}</text>"#,
        ox + PANEL_W / 2.0,
        oy + 24.0,
        esc(&format!("{} ({})", p.title, p.unit))
    );
    // Grid and ticks.
    let mut y = 0.0;
    while y <= y_max + y_step / 2.0 {
        let _ = writeln!(
            out,
            r##"<line x1="{x0:.1}" y1="{0:.1}" x2="{x1:.1}" y2="{0:.1}" stroke="#e5e5e5"/>"##,
            sy(y)
        );
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            x0 - 6.0,
            sy(y) + 4.0,
            tick_label(y, y_step)
        );
        y += y_step;
    }
    let mut x = 0.0;
    while x <= x_max + x_step / 2.0 {
        let _ = writeln!(
            out,
            r##"<line x1="{0:.1}" y1="{y0:.1}" x2="{0:.1}" y2="{1:.1}" stroke="#333333"/>"##,
            sx(x),
            y0 + 5.0
        );
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            sx(x),
            y0 + 19.0,
            thousands(x)
        );
        x += x_step;
    }
    // Axes and their labels.
    let _ = writeln!(
        out,
        r##"<line x1="{x0:.1}" y1="{y0:.1}" x2="{x1:.1}" y2="{y0:.1}" stroke="#333333"/>"##
    );
    let _ = writeln!(
        out,
        r##"<line x1="{x0:.1}" y1="{y0:.1}" x2="{x0:.1}" y2="{y1:.1}" stroke="#333333"/>"##
    );
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">sites</text>"#,
        (x0 + x1) / 2.0,
        y0 + 38.0
    );
    let (lx, ly) = (ox + 18.0, (y0 + y1) / 2.0);
    let _ = writeln!(
        out,
        r#"<text x="{lx:.1}" y="{ly:.1}" text-anchor="middle" transform="rotate(-90 {lx:.1} {ly:.1})">{}</text>"#,
        esc(p.unit)
    );
    // The target, its legend under the panel's title (clear of the points).
    let _ = writeln!(
        out,
        r##"<line class="target" x1="{x0:.1}" y1="{0:.1}" x2="{x1:.1}" y2="{0:.1}" stroke="#c0392b" stroke-width="1.5" stroke-dasharray="6 4"/>"##,
        sy(p.target)
    );
    let (cx, ty) = (ox + PANEL_W / 2.0, oy + 42.0);
    let _ = writeln!(
        out,
        r##"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#c0392b" stroke-width="1.5" stroke-dasharray="6 4"/>"##,
        cx - 122.0,
        ty - 4.0,
        cx - 96.0,
        ty - 4.0
    );
    let _ = writeln!(
        out,
        r##"<text x="{:.1}" y="{ty:.1}" fill="#c0392b">{}</text>"##,
        cx - 90.0,
        esc(&format!(
            "target at 20,000 sites: {} {}",
            fixed(p.target, p.decimals),
            p.unit
        ))
    );
    // The runs.
    if points.is_empty() {
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#888888">no data</text>"##,
            (x0 + x1) / 2.0,
            (y0 + y1) / 2.0
        );
    } else {
        let coords: Vec<String> = points
            .iter()
            .map(|&(x, v)| format!("{:.1},{:.1}", sx(x), sy(v)))
            .collect();
        let _ = writeln!(
            out,
            r##"<polyline points="{}" fill="none" stroke="#1f5fa8" stroke-width="2"/>"##,
            coords.join(" ")
        );
        for &(x, v) in &points {
            let _ = writeln!(
                out,
                r##"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="#1f5fa8"/>"##,
                sx(x),
                sy(v)
            );
            let _ = writeln!(
                out,
                r#"<text class="value" x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                sx(x),
                sy(v) - 9.0,
                fixed(v, p.decimals)
            );
        }
    }
    let _ = writeln!(out, "</g>");
}

/// 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|&s| s >= raw * (1.0 - 1e-9))
        .unwrap_or(10.0 * p)
}

/// The axis end: `v` rounded up to a multiple of its tick step.
fn nice_ceil(v: f64) -> f64 {
    let step = nice_step(v / 5.0);
    (v / step).ceil() * step
}

fn tick_label(v: f64, step: f64) -> String {
    if step >= 1.0 {
        thousands(v)
    } else {
        fixed(v, (-step.log10()).ceil() as usize)
    }
}

fn fixed(v: f64, decimals: usize) -> String {
    if decimals == 0 {
        thousands(v)
    } else {
        format!("{v:.decimals$}")
    }
}

/// A whole number with thousands separated by commas: 20000 → `20,000`.
fn thousands(v: f64) -> String {
    let n = v.round() as i64;
    let digits = n.unsigned_abs().to_string();
    let mut s = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            s.push(',');
        }
        s.push(c);
    }
    if n < 0 { format!("-{s}") } else { s }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's 20,000-site line.
    const LINE_20K: &str = "ingest sites=20000 reports=447571 lost=0 dup=0 cpu_us_per_report=126.4 rss_mb=2439 p99_visible_ms=1086 wire_bytes_per_report=404 reconnect_s=87.9";

    fn run(sites: usize, cpu: f64, rss: f64, p99: i64, reconnect: f64) -> Figures {
        Figures {
            sites,
            reports: sites as u64 * 30,
            lost: 0,
            dup: 0,
            cpu_us_per_report: cpu,
            rss_mb: rss,
            p99_visible_ms: p99,
            wire_bytes_per_report: 342.0,
            reconnect_s: reconnect,
        }
    }

    #[test]
    fn parses_a_summary_line() {
        let f = parse_line(LINE_20K)
            .expect("a summary line")
            .expect("parses");
        assert_eq!(
            f,
            Figures {
                sites: 20000,
                reports: 447571,
                lost: 0,
                dup: 0,
                cpu_us_per_report: 126.4,
                rss_mb: 2439.0,
                p99_visible_ms: 1086,
                wire_bytes_per_report: 404.0,
                reconnect_s: 87.9,
            }
        );
        // What `run` prints parses back to the same figures.
        assert_eq!(f.to_string(), LINE_20K);
        let no_events = Figures {
            p99_visible_ms: -1,
            ..run(2000, 38.5, 310.0, 0, 7.5)
        };
        let back = parse_line(&no_events.to_string()).unwrap().unwrap();
        assert_eq!(back, no_events);
    }

    #[test]
    fn other_lines_are_not_summaries() {
        for line in [
            "",
            "building release binaries...",
            "enrolling 2000 sites...",
            "geo-link sites=3 rate=20",
            "ingest: starting 5000 sites (2 of 4)",
            "# ingest sites=2000 reports=1",
        ] {
            assert!(parse_line(line).is_none(), "{line:?}");
        }
        // Leading blanks and a trailing carriage return are tolerated.
        let f = parse_line(&format!("  {LINE_20K}\r")).unwrap().unwrap();
        assert_eq!(f.sites, 20000);
    }

    #[test]
    fn a_malformed_summary_is_an_error_naming_what_is_wrong() {
        let bad_number = LINE_20K.replace("cpu_us_per_report=126.4", "cpu_us_per_report=fast");
        let e = parse_line(&bad_number).unwrap().unwrap_err().to_string();
        assert!(e.contains("cpu_us_per_report=fast"), "{e}");

        let missing = LINE_20K.replace(" reconnect_s=87.9", "");
        let e = parse_line(&missing).unwrap().unwrap_err().to_string();
        assert!(e.contains("no reconnect_s="), "{e}");

        let truncated = "ingest sites=5000 reports=1 lost";
        let e = parse_line(truncated).unwrap().unwrap_err().to_string();
        assert!(e.contains("`lost` is not key=value"), "{e}");

        let log = format!("building...\n{LINE_20K}\n{truncated}\n");
        let e = format!("{:#}", parse_log(&log).unwrap_err());
        assert!(e.contains("line 3"), "{e}");
        assert!(e.contains("not key=value"), "{e}");
    }

    #[test]
    fn a_log_gives_its_summaries_in_order() {
        let a = run(2000, 40.0, 300.0, 120, 8.0);
        let b = run(5000, 45.5, 700.0, 200, 20.5);
        let log = format!(
            "building release binaries...\ningest: 2000 sites (1 of 2)\n{a}\nsteady 15.0 s: ...\n{b}\nwake-cost futex_us=3.1\n"
        );
        assert_eq!(parse_log(&log).unwrap(), vec![a, b]);
        assert!(parse_log("nothing here\n").unwrap().is_empty());
    }

    /// Every tag is closed, in order; returns the element names in document order.
    fn check_tags(svg: &str) -> Vec<String> {
        let mut stack: Vec<String> = Vec::new();
        let mut names = Vec::new();
        let mut rest = svg;
        while let Some(start) = rest.find('<') {
            let end = rest[start..].find('>').expect("unclosed tag") + start;
            let tag = &rest[start + 1..end];
            assert!(!tag.contains('<'), "`<` inside a tag: {tag}");
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(stack.pop().as_deref(), Some(name), "mismatched </{name}>");
            } else {
                let name = tag.split_whitespace().next().expect("tag name").to_string();
                names.push(name.trim_end_matches('/').to_string());
                if !tag.ends_with('/') {
                    stack.push(name);
                }
            }
            rest = &rest[end + 1..];
        }
        assert!(stack.is_empty(), "unclosed: {stack:?}");
        names
    }

    /// The text of every `<text class="value">` of each panel, in order.
    fn panels(svg: &str) -> Vec<&str> {
        svg.split(r#"<g class="panel">"#).skip(1).collect()
    }

    fn values(panel: &str) -> Vec<String> {
        panel
            .split(r#"<text class="value""#)
            .skip(1)
            .map(|t| t[t.find('>').unwrap() + 1..t.find("</text>").unwrap()].to_string())
            .collect()
    }

    fn polyline_xs(panel: &str) -> Vec<f64> {
        let p = &panel[panel.find("<polyline points=\"").unwrap() + 18..];
        p[..p.find('"').unwrap()]
            .split(' ')
            .map(|xy| xy.split(',').next().unwrap().parse().unwrap())
            .collect()
    }

    /// The numeric attribute `name` of every element starting with `open`.
    fn attrs(panel: &str, open: &str, name: &str) -> Vec<f64> {
        let key = format!(" {name}=\"");
        panel
            .split(open)
            .skip(1)
            .map(|el| {
                let v = &el[el.find(&key).unwrap() + key.len()..];
                v[..v.find('"').unwrap()].parse().unwrap()
            })
            .collect()
    }

    #[test]
    fn the_svg_has_four_panels_with_points_labels_and_targets() {
        // Out of order on purpose: the curve goes by site count.
        let runs = [
            run(10000, 80.0, 1300.0, 700, 45.0),
            run(2000, 40.0, 300.0, 120, 8.0),
            run(5000, 55.0, 700.0, 300, 20.5),
            parse_line(LINE_20K).unwrap().unwrap(),
        ];
        let svg = svg(&runs);
        assert!(svg.starts_with("<svg "), "{}", &svg[..40]);
        assert!(svg.trim_end().ends_with("</svg>"));
        let names = check_tags(&svg);
        assert_eq!(names.iter().filter(|n| *n == "svg").count(), 1);
        assert_eq!(names.iter().filter(|n| *n == "polyline").count(), 4);
        assert_eq!(names.iter().filter(|n| *n == "circle").count(), 16);

        assert!(svg.contains("Tiandi ingest: cost against the number of sites"));
        assert!(svg.contains("4 runs (2,000, 5,000, 10,000, 20,000 sites)"));
        let panels = panels(&svg);
        assert_eq!(panels.len(), 4);
        let expect = [
            ("CPU per report (µs)", "target at 20,000 sites: 50.0 µs"),
            (
                "Memory per site, peak RSS / sites (KB)",
                "target at 20,000 sites: 52.4 KB",
            ),
            (
                "Report visible in the API, p99 (ms)",
                "target at 20,000 sites: 500 ms",
            ),
            (
                "Reconnection after a controller restart (s)",
                "target at 20,000 sites: 60.0 s",
            ),
        ];
        for (panel, (title, target)) in panels.iter().zip(expect) {
            assert!(panel.contains(title), "{title}");
            assert!(panel.contains(target), "{target}");
            assert_eq!(panel.matches("<polyline").count(), 1);
            assert_eq!(panel.matches(r#"<line class="target""#).count(), 1);
            assert!(panel.contains(">sites</text>"));
            // x ticks up to 20,000 at least.
            assert!(panel.contains(">20,000</text>"));
            let xs = polyline_xs(panel);
            assert_eq!(xs.len(), 4);
            assert!(xs.windows(2).all(|w| w[0] < w[1]), "{xs:?}");
        }
        // The target sits where its value is: 50 µs between the points of 40 and 55 µs
        // (SVG's y grows downwards), and higher values are drawn higher.
        let cys = attrs(panels[0], "<circle ", "cy");
        let target_y = attrs(panels[0], r#"<line class="target""#, "y1")[0];
        assert!(cys[0] > target_y && target_y > cys[1], "{cys:?} {target_y}");
        assert!(cys.windows(2).all(|w| w[0] > w[1]), "{cys:?}");
        // Values next to the points, in order of site count.
        assert_eq!(values(panels[0]), ["40.0", "55.0", "80.0", "126.4"]);
        // 300 MB * 1024 / 2000 sites = 153.6 KB; 2439 * 1024 / 20000 = 124.9.
        assert_eq!(values(panels[1]), ["153.6", "143.4", "133.1", "124.9"]);
        assert_eq!(values(panels[2]), ["120", "300", "700", "1,086"]);
        assert_eq!(values(panels[3]), ["8.0", "20.5", "45.0", "87.9"]);
    }

    #[test]
    fn a_run_without_a_figure_leaves_no_point() {
        // p99 of -1: no report event arrived; the panel says so instead of drawing -1.
        let svg = svg(&[run(2000, 40.0, 300.0, -1, 8.0)]);
        check_tags(&svg);
        assert!(svg.contains("1 run (2,000 sites)"));
        let panels = panels(&svg);
        assert!(panels[2].contains(">no data</text>"));
        assert!(!panels[2].contains("<polyline"));
        assert!(values(panels[2]).is_empty());
        assert_eq!(values(panels[0]), ["40.0"]);
        assert_eq!(svg.matches("<polyline").count(), 3);
    }

    #[test]
    fn axis_steps_are_round() {
        assert_eq!(nice_step(4000.0), 5000.0);
        assert_eq!(nice_step(11.5), 20.0);
        assert_eq!(nice_step(0.3), 0.5);
        assert_eq!(nice_ceil(20000.0), 20000.0);
        assert_eq!(nice_ceil(23000.0), 25000.0);
        assert_eq!(thousands(1086.0), "1,086");
        assert_eq!(thousands(100000.0), "100,000");
        assert_eq!(thousands(-1500.0), "-1,500");
        assert_eq!(tick_label(0.5, 0.1), "0.5");
        assert_eq!(esc("a<b & \"c\""), "a&lt;b &amp; &quot;c&quot;");
    }
}
