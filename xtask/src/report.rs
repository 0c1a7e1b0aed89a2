//! The ablation report: one Markdown table in the paper's shape, the same as CSV, and plots of
//! chosen log-prob and format validity over steps: small multiples, one row of panels per model,
//! SLIME with its ablations, its exponent sweep and the baselines in panels of their own, each variant a mean line
//! over seeds with a band from the lowest to the highest seed.
//!
//! Input: every finished cell directory under the results folder holds
//! - `result.json`: `{"variant", "seed", "model", "final": {metric: value}}`, and
//! - `eval.jsonl`: one `{"step", metric: value, ...}` object per evaluation.
//!
//! Rows are (model, variant) in grid order, columns the [`COLUMNS`] metrics some cell reports, as
//! mean ± std over seeds.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use plotters::prelude::*;
use serde::Deserialize;

/// Table columns: (metric key in `final`, header). A column appears when some cell reports its
/// metric: task quality on the embedded task, repetition of generations on Parquet data.
pub const COLUMNS: [(&str, &str); 6] = [
    ("eval/preference_accuracy", "pref. acc."),
    ("eval/task_accuracy", "task quality"),
    ("eval/repetition", "repetition"),
    ("eval/format_validity", "format valid"),
    ("eval/chosen_logp_drift", "chosen logp drift"),
    ("eval/collapse_fraction", "collapse frac."),
];

/// Metrics plotted over steps: (key in `eval.jsonl`, title, y-axis label, file stem).
pub const CURVES: [(&str, &str, &str, &str); 2] = [
    ("eval/chosen_logp", "Held-out chosen log-prob", "chosen log-prob per token", "chosen_logp"),
    ("eval/format_validity", "Format validity of greedy generations", "share of valid generations", "format_validity"),
];

/// `result.json` of one cell.
#[derive(Debug, Clone, Deserialize)]
pub struct CellResult {
    /// Variant name, e.g. `slime-no-anchor`.
    pub variant: String,
    /// Seed.
    pub seed: u64,
    /// Model name.
    pub model: String,
    /// Final evaluation metrics.
    pub r#final: BTreeMap<String, f64>,
}

/// One cell: its result and its evaluation curve.
#[derive(Debug, Clone)]
pub struct Cell {
    /// The result.
    pub result: CellResult,
    /// `(step, metrics)` in step order.
    pub curve: Vec<(u64, BTreeMap<String, f64>)>,
}

/// Reads every `*/result.json` (and its `eval.jsonl`) directly under `dir`.
pub fn read_cells(dir: &Path) -> Result<Vec<Cell>> {
    let mut cells = Vec::new();
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("result.json").is_file())
        .collect();
    entries.sort();
    for cell_dir in entries {
        let path = cell_dir.join("result.json");
        let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let result: CellResult = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let mut curve = Vec::new();
        let eval = cell_dir.join("eval.jsonl");
        if eval.is_file() {
            let text = fs::read_to_string(&eval).with_context(|| format!("reading {}", eval.display()))?;
            for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let value: serde_json::Value =
                    serde_json::from_str(line).with_context(|| format!("{} line {}", eval.display(), i + 1))?;
                let step =
                    value["step"].as_u64().with_context(|| format!("{} line {}: no step", eval.display(), i + 1))?;
                let metrics = value
                    .as_object()
                    .map(|o| o.iter().filter_map(|(k, v)| v.as_f64().map(|f| (k.clone(), f))).collect())
                    .unwrap_or_default();
                curve.push((step, metrics));
            }
        }
        curve.sort_by_key(|(s, _)| *s);
        cells.push(Cell { result, curve });
    }
    Ok(cells)
}

/// Mean and sample standard deviation (0 for a single value).
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = if values.len() > 1 { values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var.sqrt())
}

/// Variants in the order given, then any others alphabetically.
fn variant_order(cells: &[Cell], order: &[String]) -> Vec<String> {
    let mut names: Vec<String> =
        order.iter().filter(|v| cells.iter().any(|c| &c.result.variant == *v)).cloned().collect();
    let mut rest: Vec<String> = cells.iter().map(|c| c.result.variant.clone()).filter(|v| !names.contains(v)).collect();
    rest.sort();
    rest.dedup();
    names.extend(rest);
    names
}

/// Models in first-seen order.
fn models(cells: &[Cell]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for c in cells {
        if !out.contains(&c.result.model) {
            out.push(c.result.model.clone());
        }
    }
    out
}

/// The Markdown table and the CSV text: one row per (model, variant), metrics as mean ± sample
/// std over the seeds listed in the row.
pub fn tables(cells: &[Cell], order: &[String]) -> (String, String) {
    let columns: Vec<(&str, &str)> =
        COLUMNS.into_iter().filter(|(key, _)| cells.iter().any(|c| c.result.r#final.contains_key(*key))).collect();
    let mut md = String::from("| model | variant | seeds |");
    let mut csv = String::from("model,variant,seeds");
    for &(key, header) in &columns {
        let _ = write!(md, " {header} |");
        let _ = write!(csv, ",{key}_mean,{key}_std");
    }
    md.push_str("\n|---|---|---|");
    md.push_str(&"---|".repeat(columns.len()));
    md.push('\n');
    csv.push('\n');
    for model in models(cells) {
        for variant in variant_order(cells, order) {
            let rows: Vec<&Cell> =
                cells.iter().filter(|c| c.result.variant == variant && c.result.model == model).collect();
            if rows.is_empty() {
                continue;
            }
            let seeds = rows.iter().map(|c| c.result.seed.to_string()).collect::<Vec<_>>().join(" ");
            let _ = write!(md, "| {model} | {variant} | {seeds} |");
            let _ = write!(csv, "{model},{variant},{seeds}");
            for &(key, _) in &columns {
                let values: Vec<f64> = rows.iter().filter_map(|c| c.result.r#final.get(key).copied()).collect();
                if values.is_empty() {
                    md.push_str(" - |");
                    csv.push_str(",,");
                } else {
                    let (m, s) = mean_std(&values);
                    let _ = write!(md, " {m:.3} ± {s:.3} |");
                    let _ = write!(csv, ",{m},{s}");
                }
            }
            md.push('\n');
            csv.push('\n');
        }
    }
    (md, csv)
}

/// One evaluation step of a (model, variant) over its seeds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BandPoint {
    /// Preference step.
    pub step: f64,
    /// Mean over the seeds.
    pub mean: f64,
    /// Lowest seed.
    pub min: f64,
    /// Highest seed.
    pub max: f64,
}

/// The seed band of `key` for `variant` of `model`: mean, min and max at every step that each of
/// its seeds reported.
fn band_curve(cells: &[Cell], model: &str, variant: &str, key: &str) -> Vec<BandPoint> {
    let mut by_step: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    let rows: Vec<&Cell> = cells.iter().filter(|c| c.result.variant == variant && c.result.model == model).collect();
    for cell in &rows {
        for (step, metrics) in &cell.curve {
            if let Some(&v) = metrics.get(key) {
                by_step.entry(*step).or_default().push(v);
            }
        }
    }
    by_step
        .into_iter()
        .filter(|(_, v)| v.len() == rows.len())
        .map(|(step, v)| BandPoint {
            step: step as f64,
            mean: mean_std(&v).0,
            min: v.iter().copied().fold(f64::INFINITY, f64::min),
            max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        })
        .collect()
}

/// The kinds of panel of a model's row: SLIME with its ablations, SLIME's exponent sweep, and
/// the baselines (with SLIME drawn in each, as the reference line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Group {
    Slime,
    Exponent,
    Baselines,
}

impl Group {
    fn of(variant: &str) -> Self {
        if variant.strip_prefix("slime-p").is_some_and(|p| p.parse::<f64>().is_ok()) {
            Self::Exponent
        } else if variant == "slime" || variant.starts_with("slime-") {
            Self::Slime
        } else {
            Self::Baselines
        }
    }

    fn title(self) -> &'static str {
        match self {
            Self::Slime => "SLIME and its ablations",
            Self::Exponent => "SLIME's exponent p",
            Self::Baselines => "baselines (SLIME in black)",
        }
    }
}

/// Colours of a panel's lines besides SLIME's black: qualitative, told apart in print and by
/// most colour-blind readers (Tableau 10, then darker and lighter shades).
const PALETTE: [RGBColor; 16] = [
    RGBColor(0x4E, 0x79, 0xA7),
    RGBColor(0xF2, 0x8E, 0x2B),
    RGBColor(0xE1, 0x57, 0x59),
    RGBColor(0x76, 0xB7, 0xB2),
    RGBColor(0x59, 0xA1, 0x4F),
    RGBColor(0xED, 0xC9, 0x48),
    RGBColor(0xB0, 0x7A, 0xA1),
    RGBColor(0xFF, 0x9D, 0xA7),
    RGBColor(0x9C, 0x75, 0x5F),
    RGBColor(0xBA, 0xB0, 0xAC),
    RGBColor(0x1F, 0x3A, 0x5F),
    RGBColor(0x8C, 0x4A, 0x00),
    RGBColor(0x7A, 0x1F, 0x2B),
    RGBColor(0x2E, 0x5E, 0x2A),
    RGBColor(0x6B, 0x3F, 0x7F),
    RGBColor(0x6E, 0x6E, 0x6E),
];

/// SLIME's line.
const SLIME_COLOR: RGBColor = RGBColor(0, 0, 0);

/// One line of a panel.
#[derive(Debug, Clone)]
struct Series {
    variant: String,
    color: RGBColor,
    band: Vec<BandPoint>,
}

/// One panel: a model's variants of one group.
#[derive(Debug, Clone)]
struct Panel {
    title: String,
    series: Vec<Series>,
}

/// The small multiples of one metric: one row per model, one panel per group that has variants
/// of its own (SLIME alone, when nothing else ran). Every variant keeps its colour across rows
/// and metrics; no colour repeats within a panel.
fn panels(cells: &[Cell], order: &[String], key: &str) -> Result<Vec<Vec<Panel>>> {
    let variants = variant_order(cells, order);
    let others =
        |g: Group| -> Vec<&String> { variants.iter().filter(|v| v.as_str() != "slime" && Group::of(v) == g).collect() };
    let mut groups: Vec<Group> =
        [Group::Slime, Group::Exponent, Group::Baselines].into_iter().filter(|&g| !others(g).is_empty()).collect();
    if groups.is_empty() {
        groups.push(Group::Slime);
    }
    for g in &groups {
        if others(*g).len() > PALETTE.len() {
            bail!("{} variants in one panel, more than the {} distinct colours", others(*g).len(), PALETTE.len());
        }
    }
    let mut rows = Vec::new();
    for model in models(cells) {
        let mut row = Vec::new();
        for &group in &groups {
            let mut series = Vec::new();
            let mut add = |variant: &str, color: RGBColor| {
                let band = band_curve(cells, &model, variant, key);
                if !band.is_empty() {
                    series.push(Series { variant: variant.to_string(), color, band });
                }
            };
            for (i, variant) in others(group).into_iter().enumerate() {
                add(variant, PALETTE[i]);
            }
            add("slime", SLIME_COLOR);
            if !series.is_empty() {
                let title = if groups.len() == 1 && others(group).is_empty() {
                    model.clone()
                } else {
                    format!("{model}: {}", group.title())
                };
                row.push(Panel { title, series });
            }
        }
        if !row.is_empty() {
            rows.push(row);
        }
    }
    if rows.is_empty() {
        bail!("no `{key}` values to plot");
    }
    Ok(rows)
}

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Bundled DejaVu Sans: PNG text needs no system fonts.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    });
}

/// A plotters error as an `anyhow` one.
fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing a plot: {e:?}")
}

/// One panel's size in pixels, its legend's width within it, and the figure title's height.
const PANEL: (u32, u32) = (640, 380);
const LEGEND_WIDTH: i32 = 210;
const TITLE_HEIGHT: u32 = 44;

/// The figure's size for `rows` x `cols` panels.
fn figure_size(rows: usize, cols: usize) -> (u32, u32) {
    (PANEL.0 * cols as u32, PANEL.1 * rows as u32 + TITLE_HEIGHT)
}

/// Draws one panel: seed bands, mean lines, axes with labels, and the legend beside the data
/// (entries ordered by their last value, top to bottom, as the lines end).
fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    panel: &Panel,
    y_label: &str,
    (x0, x1): (f64, f64),
    (y0, y1): (f64, f64),
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let (plot, legend) = area.split_horizontally(PANEL.0 as i32 - LEGEND_WIDTH);
    let mut chart = ChartBuilder::on(&plot)
        .caption(&panel.title, ("sans-serif", 17))
        .margin(8)
        .margin_right(24)
        .x_label_area_size(42)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("preference step")
        .y_desc(y_label)
        .axis_desc_style(("sans-serif", 14))
        .label_style(("sans-serif", 12))
        .x_labels(6)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_labels(6)
        .bold_line_style(BLACK.mix(0.12))
        .light_line_style(TRANSPARENT)
        .draw()
        .map_err(plot_err)?;
    for s in &panel.series {
        if s.band.iter().any(|p| p.max > p.min) {
            let upper = s.band.iter().map(|p| (p.step, p.max));
            let lower = s.band.iter().rev().map(|p| (p.step, p.min));
            chart
                .draw_series(std::iter::once(Polygon::new(
                    upper.chain(lower).collect::<Vec<_>>(),
                    s.color.mix(0.15).filled(),
                )))
                .map_err(plot_err)?;
        }
    }
    // SLIME last, on top.
    for s in panel.series.iter().rev() {
        let width = if s.color == SLIME_COLOR { 3 } else { 2 };
        if s.band.len() == 1 {
            chart
                .draw_series(s.band.iter().map(|p| Circle::new((p.step, p.mean), 4, s.color.filled())))
                .map_err(plot_err)?;
        } else {
            chart
                .draw_series(LineSeries::new(s.band.iter().map(|p| (p.step, p.mean)), s.color.stroke_width(width)))
                .map_err(plot_err)?;
        }
    }
    let mut entries: Vec<&Series> = panel.series.iter().collect();
    let last = |s: &Series| s.band.last().map_or(f64::NEG_INFINITY, |p| p.mean);
    entries.sort_by(|a, b| last(b).total_cmp(&last(a)));
    let top = 36;
    for (i, s) in entries.iter().enumerate() {
        let y = top + 20 * i as i32;
        let width = if s.color == SLIME_COLOR { 3 } else { 2 };
        legend.draw(&PathElement::new(vec![(4, y), (28, y)], s.color.stroke_width(width))).map_err(plot_err)?;
        legend.draw(&Text::new(s.variant.clone(), (34, y - 7), ("sans-serif", 13).into_font())).map_err(plot_err)?;
    }
    Ok(())
}

/// Draws the small multiples of `key`: a row per model, a panel per group; within a row the
/// panels share the y axis, every panel the x axis.
fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    rows: &[Vec<Panel>],
    title: &str,
    y_label: &str,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(plot_err)?;
    let seeds_note = "line: mean over seeds, band: lowest to highest seed";
    let root = root.titled(&format!("{title} ({seeds_note})"), ("sans-serif", 19)).map_err(plot_err)?;
    let points = || rows.iter().flatten().flat_map(|p| &p.series).flat_map(|s| &s.band);
    let x1 = points().map(|p| p.step).fold(1.0, f64::max);
    let cols = rows.iter().map(Vec::len).max().unwrap_or(1);
    let areas = root.split_evenly((rows.len(), cols));
    for (r, row) in rows.iter().enumerate() {
        let bands = row.iter().flat_map(|p| &p.series).flat_map(|s| &s.band);
        let (mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY);
        for p in bands {
            (y0, y1) = (y0.min(p.min), y1.max(p.max));
        }
        let pad = ((y1 - y0) * 0.06).max(1e-3);
        for (c, panel) in row.iter().enumerate() {
            draw_panel(&areas[r * cols + c], panel, y_label, (0.0, x1), (y0 - pad, y1 + pad))?;
        }
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

/// Writes `table.md`, `table.csv` and `plots/{chosen_logp,format_validity}.{png,svg}` into `out`.
pub fn write_report(cells: &[Cell], order: &[String], out: &Path) -> Result<Vec<PathBuf>> {
    register_font();
    fs::create_dir_all(out.join("plots")).with_context(|| format!("creating {}", out.display()))?;
    let (md, csv) = tables(cells, order);
    let mut written = Vec::new();
    for (name, text) in [("table.md", md), ("table.csv", csv)] {
        let path = out.join(name);
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    for (key, title, y_label, stem) in CURVES {
        let rows = panels(cells, order, key)?;
        let size = figure_size(rows.len(), rows.iter().map(Vec::len).max().unwrap_or(1));
        let png = out.join("plots").join(format!("{stem}.png"));
        draw(BitMapBackend::new(&png, size).into_drawing_area(), &rows, title, y_label)?;
        let svg = out.join("plots").join(format!("{stem}.svg"));
        draw(SVGBackend::new(&svg, size).into_drawing_area(), &rows, title, y_label)?;
        written.extend([png, svg]);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(variant: &str, seed: u64, acc: f64) -> Cell {
        let mut fin = BTreeMap::new();
        fin.insert("eval/preference_accuracy".to_string(), acc);
        let curve = (0..5u32)
            .map(|s| {
                let mut m = BTreeMap::new();
                m.insert("eval/chosen_logp".to_string(), -1.0 - 0.1 * f64::from(s) * acc);
                m.insert("eval/format_validity".to_string(), 1.0 - 0.05 * f64::from(s));
                (u64::from(s) * 10, m)
            })
            .collect();
        Cell { result: CellResult { variant: variant.into(), seed, model: "tiny-llama".into(), r#final: fin }, curve }
    }

    #[test]
    fn table_has_mean_and_sample_std_in_grid_order() {
        let mut cells = vec![cell("dpo", 0, 0.5), cell("slime", 0, 0.6), cell("slime", 1, 0.8), cell("dpo", 1, 0.7)];
        cells[0].result.r#final.insert("eval/task_accuracy".into(), 0.25);
        let (md, csv) = tables(&cells, &["slime".into(), "dpo".into()]);
        assert!(md.starts_with("| model | variant | seeds | pref. acc. | task quality |\n"), "{md}");
        assert!(!md.contains("repetition"), "a metric no cell reports has no column: {md}");
        let lines: Vec<&str> = md.lines().collect();
        // slime: mean 0.7, sample std sqrt(((0.1)^2 + (0.1)^2) / 1) = 0.1414.
        assert!(lines[2].starts_with("| tiny-llama | slime | 0 1 | 0.700 ± 0.141 |"), "{md}");
        assert!(lines[3].starts_with("| tiny-llama | dpo | 0 1 | 0.600 ± 0.141 | 0.250 ± 0.000 |"), "{md}");
        assert!(lines[2].ends_with(" - |"), "missing metrics are dashes: {md}");
        assert!(csv.lines().nth(1).is_some_and(|l| l.starts_with("tiny-llama,slime,0 1,0.7")), "{csv}");
    }

    #[test]
    fn bands_span_the_seeds_of_one_model_only() {
        let mut gemma = cell("slime", 0, 0.2);
        gemma.result.model = "tiny-gemma".into();
        let cells = vec![cell("slime", 0, 0.6), cell("slime", 1, 0.8), gemma];
        let llama = band_curve(&cells, "tiny-llama", "slime", "eval/chosen_logp");
        let gemma = band_curve(&cells, "tiny-gemma", "slime", "eval/chosen_logp");
        // Step 40: -1 - 0.1 * 4 * acc over llama's two seeds (acc 0.6, 0.8) only.
        let p = llama[4];
        assert_eq!(p.step, 40.0);
        assert!((p.mean - (-1.0 - 0.4 * 0.7)).abs() < 1e-12, "{llama:?}");
        assert!((p.min - (-1.0 - 0.4 * 0.8)).abs() < 1e-12 && (p.max - (-1.0 - 0.4 * 0.6)).abs() < 1e-12, "{p:?}");
        assert!((gemma[4].mean - (-1.0 - 0.4 * 0.2)).abs() < 1e-12, "{gemma:?}");
        assert_eq!(gemma[4].min, gemma[4].max, "one seed: no band");
    }

    #[test]
    fn a_step_some_seed_missed_is_left_out() {
        let mut short = cell("dpo", 1, 0.5);
        short.curve.pop();
        let cells = vec![cell("dpo", 0, 0.5), short];
        let band = band_curve(&cells, "tiny-llama", "dpo", "eval/chosen_logp");
        assert_eq!(band.iter().map(|p| p.step).collect::<Vec<_>>(), [0.0, 10.0, 20.0, 30.0]);
    }

    #[test]
    fn panels_split_slime_and_ablations_from_baselines_per_model() -> Result<()> {
        let names = ["slime", "slime-no-anchor", "slime-p1.0", "dpo", "simpo", "sft"];
        let mut cells: Vec<Cell> = names.iter().map(|v| cell(v, 0, 0.5)).collect();
        for v in names {
            let mut c = cell(v, 0, 0.4);
            c.result.model = "tiny-gemma".into();
            cells.push(c);
        }
        let order: Vec<String> = names.iter().map(|v| v.to_string()).collect();
        let rows = panels(&cells, &order, "eval/chosen_logp")?;
        assert_eq!(rows.len(), 2, "a row per model");
        let variants = |p: &Panel| p.series.iter().map(|s| s.variant.clone()).collect::<Vec<_>>();
        for (row, model) in rows.iter().zip(["tiny-llama", "tiny-gemma"]) {
            assert_eq!(row.len(), 3, "{model}: ablations, exponents and baselines apart");
            assert!(row[0].title.starts_with(model) && row[0].title.contains("ablations"), "{}", row[0].title);
            assert_eq!(variants(&row[0]), ["slime-no-anchor", "slime"]);
            assert_eq!(variants(&row[1]), ["slime-p1.0", "slime"]);
            assert_eq!(variants(&row[2]), ["dpo", "simpo", "sft", "slime"], "SLIME is the reference line");
            for panel in row {
                let mut colors: Vec<(u8, u8, u8)> =
                    panel.series.iter().map(|s| (s.color.0, s.color.1, s.color.2)).collect();
                colors.sort_unstable();
                colors.dedup();
                assert_eq!(colors.len(), panel.series.len(), "no colour repeats within a panel");
                let slime = panel.series.iter().find(|s| s.variant == "slime").map(|s| s.color);
                assert_eq!(slime, Some(SLIME_COLOR));
            }
        }
        // A variant keeps its colour in every row.
        assert_eq!(rows[0][2].series[1].color, rows[1][2].series[1].color);
        Ok(())
    }

    #[test]
    fn without_ablations_only_the_baselines_panel_remains() -> Result<()> {
        let cells = vec![cell("slime", 0, 0.6), cell("dpo", 0, 0.4)];
        let rows = panels(&cells, &[], "eval/format_validity")?;
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].len(), 1);
        assert!(rows[0][0].title.contains("baselines"), "{}", rows[0][0].title);
        let only_slime = panels(&[cell("slime", 0, 0.6)], &[], "eval/format_validity")?;
        assert_eq!(only_slime[0][0].title, "tiny-llama");
        assert!(panels(&cells, &[], "eval/absent").is_err(), "nothing to plot is an error");
        Ok(())
    }

    #[test]
    fn report_files_are_written_and_png_is_an_image() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let cells = vec![cell("slime", 0, 0.6), cell("dpo", 0, 0.4)];
        let files = write_report(&cells, &[], dir.path())?;
        assert_eq!(files.len(), 6);
        let png = fs::read(dir.path().join("plots/chosen_logp.png"))?;
        assert_eq!(&png[1..4], b"PNG");
        // One model, one panel (no ablations): the IHDR width and height.
        let size = |at: usize| u32::from_be_bytes([png[at], png[at + 1], png[at + 2], png[at + 3]]);
        assert_eq!((size(16), size(20)), figure_size(1, 1));
        let svg = fs::read_to_string(dir.path().join("plots/format_validity.svg"))?;
        assert!(svg.contains("<svg") && svg.contains("slime"));
        Ok(())
    }

    #[test]
    fn cells_are_read_back_from_disk() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let cell_dir = dir.path().join("slime-seed0");
        fs::create_dir_all(&cell_dir)?;
        fs::write(
            cell_dir.join("result.json"),
            r#"{"variant":"slime","seed":0,"model":"tiny-llama","final":{"eval/format_validity":0.9}}"#,
        )?;
        fs::write(
            cell_dir.join("eval.jsonl"),
            "{\"step\":10,\"eval/format_validity\":0.8}\n{\"step\":0,\"eval/format_validity\":1.0}\n",
        )?;
        fs::create_dir_all(dir.path().join("unfinished"))?;
        let cells = read_cells(dir.path())?;
        assert_eq!(cells.len(), 1);
        assert_eq!(cells[0].curve[0].0, 0);
        fs::write(cell_dir.join("eval.jsonl"), "{\"nostep\":1}\n")?;
        let err = read_cells(dir.path()).expect_err("bad line");
        assert!(format!("{err:#}").contains("eval.jsonl line 1"), "{err:#}");
        Ok(())
    }
}
