//! The ablation report: one Markdown table in the paper's shape, the same as CSV, and plots of
//! chosen log-prob and format validity over steps for every variant.
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

/// Metrics plotted over steps: (key in `eval.jsonl`, title, file stem).
pub const CURVES: [(&str, &str, &str); 2] = [
    ("eval/chosen_logp", "held-out chosen log-prob (mean per token)", "chosen_logp"),
    ("eval/format_validity", "format validity of greedy generations", "format_validity"),
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

/// Mean curve over seeds of `key` for `variant` of `model`: `(step, mean)` at steps every seed
/// reported.
fn mean_curve(cells: &[Cell], model: &str, variant: &str, key: &str) -> Vec<(f64, f64)> {
    let mut by_step: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    let rows: Vec<&Cell> = cells.iter().filter(|c| c.result.variant == variant && c.result.model == model).collect();
    for cell in &rows {
        for (step, metrics) in &cell.curve {
            if let Some(&v) = metrics.get(key) {
                by_step.entry(*step).or_default().push(v);
            }
        }
    }
    by_step.into_iter().filter(|(_, v)| v.len() == rows.len()).map(|(s, v)| (s as f64, mean_std(&v).0)).collect()
}

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Bundled DejaVu Sans: PNG text needs no system fonts.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    });
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    cells: &[Cell],
    order: &[String],
    key: &str,
    title: &str,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let variants = variant_order(cells, order);
    let models = models(cells);
    // One line per (model, variant); labelled by the variant alone when there is one model.
    let label = |m: &str, v: &str| if models.len() > 1 { format!("{m} {v}") } else { v.to_string() };
    let curves: Vec<(String, Vec<(f64, f64)>)> = models
        .iter()
        .flat_map(|m| variants.iter().map(move |v| (m, v)))
        .map(|(m, v)| (label(m, v), mean_curve(cells, m, v, key)))
        .filter(|(_, c)| !c.is_empty())
        .collect();
    let points = curves.iter().flat_map(|(_, c)| c.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in points {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if !x0.is_finite() {
        bail!("no `{key}` values to plot");
    }
    let pad = ((y1 - y0) * 0.05).max(1e-3);
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - pad)..(y1 + pad))
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    for (i, (name, curve)) in curves.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(curve.iter().copied(), color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e:?}"))?;
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
    for (key, title, stem) in CURVES {
        let png = out.join("plots").join(format!("{stem}.png"));
        draw(BitMapBackend::new(&png, (900, 560)).into_drawing_area(), cells, order, key, title)?;
        let svg = out.join("plots").join(format!("{stem}.svg"));
        draw(SVGBackend::new(&svg, (900, 560)).into_drawing_area(), cells, order, key, title)?;
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
    fn curves_average_seeds_of_one_model_only() {
        let mut gemma = cell("slime", 0, 0.2);
        gemma.result.model = "tiny-gemma".into();
        let cells = vec![cell("slime", 0, 0.6), cell("slime", 1, 0.8), gemma];
        let llama = mean_curve(&cells, "tiny-llama", "slime", "eval/chosen_logp");
        let gemma = mean_curve(&cells, "tiny-gemma", "slime", "eval/chosen_logp");
        // Step 40: -1 - 0.1 * 4 * acc, averaged over llama's two seeds (acc 0.6, 0.8) only.
        assert!((llama[4].1 - (-1.0 - 0.4 * 0.7)).abs() < 1e-12, "{llama:?}");
        assert!((gemma[4].1 - (-1.0 - 0.4 * 0.2)).abs() < 1e-12, "{gemma:?}");
    }

    #[test]
    fn report_files_are_written_and_png_is_an_image() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let cells = vec![cell("slime", 0, 0.6), cell("dpo", 0, 0.4)];
        let files = write_report(&cells, &[], dir.path())?;
        assert_eq!(files.len(), 6);
        let png = fs::read(dir.path().join("plots/chosen_logp.png"))?;
        assert_eq!(&png[1..4], b"PNG");
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
