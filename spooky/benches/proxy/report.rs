//! The bench's results: samples per (scenario, metric, target), medians,
//! the spooky/Caddy ratio, the targets checked against Caddy from the same
//! run, and the reports (`<UTC timestamp>.md`, `.json`, `latest.*`, and the
//! chart `latest.png`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use serde_json::{Value, json};

/// What a metric's spooky/Caddy ratio (or spooky's own value) must meet.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Goal {
    None,
    /// spooky / Caddy at most this.
    RatioAtMost(f64),
    /// spooky / Caddy at least this.
    RatioAtLeast(f64),
    /// spooky's value below this, in the metric's unit (absolute).
    SpookyBelow(f64),
}

/// A metric as the table shows it.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub name: &'static str,
    pub unit: &'static str,
    pub lower_better: bool,
    pub goal: Goal,
}

impl Metric {
    pub const fn new(name: &'static str, unit: &'static str, lower_better: bool) -> Self {
        Metric {
            name,
            unit,
            lower_better,
            goal: Goal::None,
        }
    }

    pub const fn goal(mut self, goal: Goal) -> Self {
        self.goal = goal;
        self
    }
}

// The targets of the issue, checked against Caddy from the same run.
pub const RPS: Metric = Metric::new("requests/s", "req/s", false).goal(Goal::RatioAtLeast(1.3));
pub const P50: Metric = Metric::new("p50 latency", "us", true);
pub const P99: Metric = Metric::new("p99 latency", "us", true).goal(Goal::RatioAtMost(1.0));
pub const P999: Metric = Metric::new("p99.9 latency", "us", true);
pub const MEAN: Metric = Metric::new("mean latency", "us", true);
pub const CPU_1K: Metric =
    Metric::new("proxy CPU per 1k requests", "s", true).goal(Goal::RatioAtMost(0.5));
pub const BACKEND_CPU_1K: Metric = Metric::new("backend CPU per 1k requests", "s", true);
pub const PEAK_RSS: Metric =
    Metric::new("peak RSS under load", "MiB", true).goal(Goal::RatioAtMost(0.5));
pub const ERRORS: Metric = Metric::new("errors", "count", true);
pub const IDLE_RSS: Metric =
    Metric::new("RSS per idle connection", "KiB", true).goal(Goal::RatioAtMost(1.0));
pub const START_RSS: Metric = Metric::new("RSS after start", "MiB", true);
pub const RATE: Metric = Metric::new("rate", "MiB/s", false);
pub const CPU_GIB: Metric = Metric::new("proxy CPU per GiB", "s", true);
pub const TRANSFER_PEAK: Metric = Metric::new("peak RSS", "MiB", true);
pub const GROWTH: Metric = Metric::new("RSS growth", "MiB", true);
pub const GROWTH_100M: Metric =
    Metric::new("RSS growth", "MiB", true).goal(Goal::SpookyBelow(32.0));

pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

struct Row {
    scenario: String,
    metric: Metric,
}

/// Samples per (scenario, metric, target), rows in insertion order.
#[derive(Default)]
pub struct Table {
    rows: Vec<Row>,
    samples: BTreeMap<(String, String, String), Vec<f64>>,
    pub notes: Vec<String>,
}

/// One checked target.
pub struct Check {
    pub scenario: String,
    pub metric: String,
    pub unit: &'static str,
    pub goal: Goal,
    pub spooky: f64,
    pub caddy: Option<f64>,
    pub ratio: Option<f64>,
    pub pass: bool,
}

impl Check {
    pub fn rule(&self) -> String {
        match self.goal {
            Goal::RatioAtMost(x) => format!("spooky/Caddy <= {x}"),
            Goal::RatioAtLeast(x) => format!("spooky/Caddy >= {x}"),
            Goal::SpookyBelow(x) => format!("spooky < {x} {}", self.unit),
            Goal::None => String::new(),
        }
    }
}

/// A number with about three significant digits.
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return "-".to_owned();
    }
    let a = v.abs();
    if a >= 1000.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 10.0 {
        format!("{v:.2}")
    } else if a >= 1.0 {
        format!("{v:.3}")
    } else {
        // 0.0316, 0.00412
        let digits = (2 - a.log10().floor() as i32).clamp(3, 8) as usize;
        format!("{v:.digits$}")
    }
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), fmt_num)
}

impl Table {
    pub fn add(&mut self, scenario: &str, metric: Metric, target: &str, v: f64) {
        if !self
            .rows
            .iter()
            .any(|r| r.scenario == scenario && r.metric.name == metric.name)
        {
            self.rows.push(Row {
                scenario: scenario.to_owned(),
                metric,
            });
        }
        self.samples
            .entry((
                scenario.to_owned(),
                metric.name.to_owned(),
                target.to_owned(),
            ))
            .or_default()
            .push(v);
    }

    pub fn get(&self, scenario: &str, metric: &str, target: &str) -> Option<f64> {
        self.samples
            .get(&(scenario.to_owned(), metric.to_owned(), target.to_owned()))
            .map(|v| median(v.clone()))
    }

    fn samples_of(&self, scenario: &str, metric: &str, target: &str) -> Vec<f64> {
        self.samples
            .get(&(scenario.to_owned(), metric.to_owned(), target.to_owned()))
            .cloned()
            .unwrap_or_default()
    }

    fn ratio(&self, r: &Row) -> Option<f64> {
        match (
            self.get(&r.scenario, r.metric.name, "spooky"),
            self.get(&r.scenario, r.metric.name, "caddy"),
        ) {
            (Some(a), Some(b)) if b != 0.0 => Some(a / b),
            _ => None,
        }
    }

    /// Every row with a goal that has a spooky figure.
    pub fn checks(&self) -> Vec<Check> {
        let mut out = Vec::new();
        for r in &self.rows {
            if r.metric.goal == Goal::None {
                continue;
            }
            let Some(spooky) = self.get(&r.scenario, r.metric.name, "spooky") else {
                continue;
            };
            let caddy = self.get(&r.scenario, r.metric.name, "caddy");
            let ratio = self.ratio(r);
            let pass = match r.metric.goal {
                Goal::RatioAtMost(x) => ratio.is_some_and(|v| v <= x),
                Goal::RatioAtLeast(x) => ratio.is_some_and(|v| v >= x),
                Goal::SpookyBelow(x) => spooky < x,
                Goal::None => true,
            };
            if matches!(r.metric.goal, Goal::RatioAtMost(_) | Goal::RatioAtLeast(_))
                && ratio.is_none()
            {
                continue;
            }
            out.push(Check {
                scenario: r.scenario.clone(),
                metric: r.metric.name.to_owned(),
                unit: r.metric.unit,
                goal: r.metric.goal,
                spooky,
                caddy,
                ratio,
                pass,
            });
        }
        out
    }

    /// The plain-text table printed at the end of a run.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<36} {:<34} {:>10} {:>10} {:>7}  {:<6} {:>10}",
            "scenario", "metric (median)", "spooky", "caddy", "ratio", "better", "baseline"
        );
        let _ = writeln!(s, "{}", "-".repeat(122));
        let mut last = "";
        for r in &self.rows {
            let get = |t| self.get(&r.scenario, r.metric.name, t);
            let scen = if r.scenario == last { "" } else { &r.scenario };
            last = &r.scenario;
            let _ = writeln!(
                s,
                "{:<36} {:<34} {:>10} {:>10} {:>7}  {:<6} {:>10}",
                scen,
                format!("{} ({})", r.metric.name, r.metric.unit),
                opt(get("spooky")),
                opt(get("caddy")),
                self.ratio(r)
                    .map_or_else(|| "-".to_owned(), |v| format!("{v:.2}")),
                if r.metric.lower_better {
                    "lower"
                } else {
                    "higher"
                },
                opt(get("baseline")),
            );
        }
        for n in &self.notes {
            let _ = writeln!(s, "{n}");
        }
        s
    }

    /// PASS/FAIL per target, printed after the table.
    pub fn render_checks(&self) -> String {
        let mut s = String::new();
        let checks = self.checks();
        let _ = writeln!(s, "targets against Caddy (same run, medians):");
        for c in &checks {
            let _ = writeln!(
                s,
                "  {} {:<36} {:<28} {:<22} spooky {} caddy {}{}",
                if c.pass { "PASS" } else { "FAIL" },
                c.scenario,
                c.metric,
                c.rule(),
                fmt_num(c.spooky),
                opt(c.caddy),
                c.ratio
                    .map_or_else(String::new, |r| format!(" ratio {r:.3}")),
            );
        }
        let passed = checks.iter().filter(|c| c.pass).count();
        let _ = writeln!(s, "  {passed} of {} targets met", checks.len());
        s
    }

    pub fn to_json(&self) -> Value {
        let mut rows = Vec::new();
        for r in &self.rows {
            let mut samples = serde_json::Map::new();
            let mut medians = serde_json::Map::new();
            for t in ["spooky", "caddy", "baseline"] {
                let v = self.samples_of(&r.scenario, r.metric.name, t);
                if !v.is_empty() {
                    medians.insert(t.to_owned(), json!(median(v.clone())));
                    samples.insert(t.to_owned(), json!(v));
                }
            }
            rows.push(json!({
                "scenario": r.scenario,
                "metric": r.metric.name,
                "unit": r.metric.unit,
                "lower_is_better": r.metric.lower_better,
                "spooky": medians.get("spooky"),
                "caddy": medians.get("caddy"),
                "ratio": self.ratio(r),
                "baseline": medians.get("baseline"),
                "samples": samples,
            }));
        }
        let checks: Vec<Value> = self
            .checks()
            .iter()
            .map(|c| {
                json!({
                    "scenario": c.scenario,
                    "metric": c.metric,
                    "rule": c.rule(),
                    "spooky": c.spooky,
                    "caddy": c.caddy,
                    "ratio": c.ratio,
                    "pass": c.pass,
                })
            })
            .collect();
        json!({ "results": rows, "targets": checks, "notes": self.notes })
    }

    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "| scenario | metric (median) | spooky | Caddy | spooky / Caddy | baseline (direct) | target |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---|");
        let checks = self.checks();
        let mut last = "";
        for r in &self.rows {
            let get = |t| self.get(&r.scenario, r.metric.name, t);
            let scen = if r.scenario == last { "" } else { &r.scenario };
            last = &r.scenario;
            let target = checks
                .iter()
                .find(|c| c.scenario == r.scenario && c.metric == r.metric.name)
                .map_or_else(String::new, |c| {
                    format!("{} {}", c.rule(), if c.pass { "PASS" } else { "**FAIL**" })
                });
            let _ = writeln!(
                s,
                "| {} | {} ({}) | {} | {} | {} | {} | {} |",
                scen,
                r.metric.name,
                r.metric.unit,
                opt(get("spooky")),
                opt(get("caddy")),
                self.ratio(r)
                    .map_or_else(|| "-".to_owned(), |v| format!("{v:.2}")),
                opt(get("baseline")),
                target,
            );
        }
        s
    }

    /// The rows for the chart, those with a target against Caddy: (label,
    /// ratio, target met, the target's ratio).
    fn ratios(&self) -> Vec<(String, f64, bool, f64)> {
        self.rows
            .iter()
            .filter(|r| matches!(r.metric.goal, Goal::RatioAtMost(_) | Goal::RatioAtLeast(_)))
            .filter_map(|r| {
                let v = self.ratio(r)?;
                (v.is_finite() && v > 0.0).then(|| {
                    (
                        format!("{}: {}", r.scenario, r.metric.name),
                        v,
                        match r.metric.goal {
                            Goal::RatioAtMost(x) => v <= x,
                            Goal::RatioAtLeast(x) => v >= x,
                            _ => true,
                        },
                        match r.metric.goal {
                            Goal::RatioAtMost(x) | Goal::RatioAtLeast(x) => x,
                            _ => 1.0,
                        },
                    )
                })
            })
            .collect()
    }
}

/// The machine a run was taken on.
pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|v| v.split_once(':'))
        .map_or_else(|| "unknown".to_owned(), |(_, v)| v.trim().to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".to_owned(), |v| v.trim().to_owned());
    let tool = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_owned()
            })
    };
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
    json!({
        "cpu": cpu,
        "cores": cores,
        "memory_gib": mem_kib.map(|k| (k as f64 / (1u64 << 20) as f64 * 10.0).round() / 10.0),
        "kernel": kernel,
        "rustc": tool(&rustc, &["--version"]),
        "caddy": tool("caddy", &["version"]),
        "oha": tool("oha", &["--version"]),
        "h2load": tool("h2load", &["--version"]),
        "git_commit": tool("git", &["rev-parse", "--short", "HEAD"]),
        "loadavg_at_start": std::fs::read_to_string("/proc/loadavg").ok().map(|v| v.trim().to_owned()),
    })
}

/// `YYYY-MM-DDTHH-MM-SSZ` (UTC, file-name safe) from the system clock.
pub fn utc_stamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}-{:02}-{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Writes `<stamp>.md`, `<stamp>.json`, `latest.md`, `latest.json` and
/// `latest.png` into `dir`; returns the paths written.
pub fn write_reports(
    dir: &Path,
    stamp: &str,
    table: &Table,
    machine: &Value,
    options: &Value,
    elapsed_s: f64,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = &dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mut doc = table.to_json();
    if let Value::Object(m) = &mut doc {
        m.insert("timestamp".to_owned(), json!(stamp));
        m.insert("machine".to_owned(), machine.clone());
        m.insert("options".to_owned(), options.clone());
        m.insert("elapsed_s".to_owned(), json!(elapsed_s));
    }
    let json_text = serde_json::to_string_pretty(&doc)?;

    let mut md = String::new();
    let _ = writeln!(md, "# spooky vs Caddy: {stamp}\n");
    let field = |k: &str| match &machine[k] {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        v => v.to_string(),
    };
    let _ = writeln!(
        md,
        "Machine: {} ({} cores, {} GiB), kernel {}, {}; Caddy {}; {}; load average at start {} (a busy machine makes absolute figures noisy).\n",
        field("cpu"),
        field("cores"),
        field("memory_gib"),
        field("kernel"),
        field("rustc"),
        field("caddy"),
        field("oha"),
        field("loadavg_at_start"),
    );
    let _ = writeln!(
        md,
        "Options: `{}`; whole run {:.0} s. Medians over interleaved rounds; the ratio is spooky's median over Caddy's; baseline is the same client straight to the backend.\n",
        options, elapsed_s
    );
    md.push_str(&table.to_markdown());
    md.push_str("\n## Targets (against Caddy from the same run)\n\n");
    for c in table.checks() {
        let _ = writeln!(
            md,
            "* {} {}: {}, {} (spooky {}, Caddy {}{})",
            if c.pass { "PASS" } else { "**FAIL**" },
            c.scenario,
            c.metric,
            c.rule(),
            fmt_num(c.spooky),
            opt(c.caddy),
            c.ratio
                .map_or_else(String::new, |r| format!(", ratio {r:.3}")),
        );
    }
    if !table.notes.is_empty() {
        md.push_str("\n## Notes\n\n");
        for n in &table.notes {
            let _ = writeln!(md, "* {n}");
        }
    }

    let mut written = Vec::new();
    for (name, text) in [
        (format!("{stamp}.md"), &md),
        ("latest.md".to_owned(), &md),
        (format!("{stamp}.json"), &json_text),
        ("latest.json".to_owned(), &json_text),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))?;
        written.push(p);
    }
    let png = dir.join("latest.png");
    chart(&png, table, stamp)?;
    written.push(png);
    Ok(written)
}

/// A TrueType font for the chart's labels, if the system has one. plotters
/// is built without its system-font backend (fontconfig/freetype); it
/// draws text with ab_glyph from a font registered here instead, so with
/// no font on the machine the chart is drawn without labels.
fn register_font() -> bool {
    const CANDIDATES: [&str; 4] = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
        "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    ];
    for path in CANDIDATES {
        if let Ok(bytes) = std::fs::read(path) {
            // register_font keeps a 'static reference: the font lives for
            // the rest of the (short) bench process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font(
                "sans-serif",
                plotters::style::FontStyle::Normal,
                bytes,
            )
            .is_ok()
            {
                return true;
            }
        }
    }
    false
}

/// A horizontal bar per metric with a target against Caddy: spooky / Caddy
/// on a log2 axis, the 1.0 line marking parity, a black mark at the
/// target's ratio, green where the target is met, red where it is missed.
fn chart(path: &Path, table: &Table, stamp: &str) -> Result<()> {
    use plotters::prelude::*;

    let rows = table.ratios();
    let text = register_font();
    if !text {
        println!("chart: no TrueType font found (fonts-dejavu-core), drawing it without labels");
    }
    let row_h = 22i32;
    let (w, top, label_w) = (1100i32, 40i32, 560i32);
    let h = top + row_h * rows.len().max(1) as i32 + 40;
    let root = BitMapBackend::new(path, (w as u32, h as u32)).into_drawing_area();
    let err = |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("chart: {e:?}");
    root.fill(&WHITE).map_err(err)?;
    // log2(ratio) in [-3, 3] -> x in [label_w, w - 20].
    let (x0, x1) = (label_w, w - 20);
    let x_of = |r: f64| {
        let l = r.log2().clamp(-3.0, 3.0);
        x0 + ((l + 3.0) / 6.0 * f64::from(x1 - x0)) as i32
    };
    let mid = x_of(1.0);
    if text {
        let title = format!(
            "spooky / Caddy (log scale, 1.0 = parity; black marks: targets; green: target met, red: missed) {stamp}"
        );
        root.draw(&Text::new(title, (10, 10), ("sans-serif", 16).into_font()))
            .map_err(err)?;
        for (r, label) in [
            (0.125, "1/8"),
            (0.25, "1/4"),
            (0.5, "1/2"),
            (1.0, "1"),
            (2.0, "2"),
            (4.0, "4"),
            (8.0, "8"),
        ] {
            root.draw(&Text::new(
                label,
                (x_of(r) - 6, h - 30),
                ("sans-serif", 13).into_font(),
            ))
            .map_err(err)?;
        }
    }
    for r in [0.125, 0.25, 0.5, 2.0, 4.0, 8.0] {
        let x = x_of(r);
        root.draw(&PathElement::new(
            vec![(x, top - 4), (x, h - 36)],
            RGBColor(220, 220, 220),
        ))
        .map_err(err)?;
    }
    for (i, (label, ratio, good, _)) in rows.iter().enumerate() {
        let y = top + i as i32 * row_h;
        let x = x_of(*ratio);
        let color = if *good {
            RGBColor(60, 160, 80)
        } else {
            RGBColor(200, 60, 60)
        };
        let (a, b) = if x < mid {
            (x, mid)
        } else {
            (mid, x.max(mid + 1))
        };
        root.draw(&Rectangle::new(
            [(a, y + 3), (b, y + row_h - 3)],
            color.filled(),
        ))
        .map_err(err)?;
        if text {
            root.draw(&Text::new(
                label.clone(),
                (10, y + 4),
                ("sans-serif", 13).into_font(),
            ))
            .map_err(err)?;
            let tx = if x < mid { mid + 4 } else { (mid - 46).max(x0) };
            root.draw(&Text::new(
                format!("{ratio:.2}"),
                (tx, y + 4),
                ("sans-serif", 13).into_font(),
            ))
            .map_err(err)?;
        }
    }
    // Each target's ratio: a short black mark across its row.
    for (i, (_, _, _, limit)) in rows.iter().enumerate() {
        let (y, t) = (top + i as i32 * row_h, x_of(*limit));
        root.draw(&PathElement::new(
            vec![(t, y + 1), (t, y + row_h - 1)],
            BLACK.stroke_width(3),
        ))
        .map_err(err)?;
    }
    root.draw(&PathElement::new(
        vec![(mid, top - 4), (mid, h - 36)],
        BLACK.stroke_width(2),
    ))
    .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}
