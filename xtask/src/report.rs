//! The ablation report: one Markdown table in the paper's shape, the same as CSV, and plots of
//! chosen log-prob and format validity over steps: small multiples, one row of panels per model,
//! SLIME with its ablations, its exponent sweep and the baselines in panels of their own, each variant a mean line
//! over seeds with a band from the lowest to the highest seed.
//!
//! Input: every finished cell directory under the results folder holds
//! - `result.json`: `{"variant", "seed", "model", "final": {metric: value}, "items": {"pairs",
//!   "values": {metric: [value per held-out item]}}}` (`items` may be absent),
//! - `eval.jsonl`: one `{"step", metric: value, ...}` object per evaluation, and, for Parquet
//!   data, `data.json` (what the load read, cut and dropped, and the pair lengths).
//!
//! Rows are (model, variant) in grid order, columns the [`COLUMNS`] metrics some cell reports,
//! each as its estimate and 95% percentile-bootstrap interval over seeds and held-out items
//! ([`crate::stats`]). The chosen log-prob drift of an item is its chosen log-prob under the
//! variant minus under the seed's SFT model (the `sft` cell, every variant's starting point).
//! A second table gives each variant's paired difference from full SLIME on the same seeds and
//! items, and the report lists which differences the intervals resolve (exclude 0) and which
//! they do not. A cell without per-item values counts as one item per seed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use plotters::prelude::*;
use serde::Deserialize;

use crate::grid::{Layout, SLIME};
use crate::stats::{Bootstrap, DEFAULT_RESAMPLES, Interval};

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
    /// The per-item values of the final evaluation (absent in older results).
    #[serde(default)]
    pub items: Option<Items>,
}

/// Per-item values of an evaluation: `values[metric][i]` belongs to held-out pair `pairs[i]`
/// (generation metrics cover the first pairs only).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Items {
    /// Held-out pair ids in evaluation order.
    #[serde(default)]
    pub pairs: Vec<u64>,
    /// Values by metric key.
    #[serde(default)]
    pub values: BTreeMap<String, Vec<f64>>,
}

/// One cell: its result, its evaluation curve and its `data.json`.
#[derive(Debug, Clone)]
pub struct Cell {
    /// The result.
    pub result: CellResult,
    /// `(step, metrics)` in step order.
    pub curve: Vec<(u64, BTreeMap<String, f64>)>,
    /// What the data load did (`data.json`; Parquet data only).
    pub data: Option<DataSummary>,
}

/// The part of a cell's `data.json` the table's caption states.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct DataSummary {
    /// The data file.
    #[serde(default)]
    pub file: String,
    /// Rows read.
    #[serde(default)]
    pub rows: u64,
    /// Pairs per split.
    #[serde(default)]
    pub sft_pairs: u64,
    /// Preference pairs.
    #[serde(default)]
    pub preference_pairs: u64,
    /// Held-out pairs evaluated.
    #[serde(default)]
    pub eval_pairs: u64,
    /// Pairs cut to the length limits.
    #[serde(default)]
    pub truncated_pairs: u64,
    /// `truncate` or `drop`.
    #[serde(default)]
    pub overlong: Option<String>,
    /// Pairs left out as too long, by split.
    #[serde(default)]
    pub dropped_overlong: BTreeMap<String, u64>,
    /// The length distribution.
    #[serde(default)]
    pub lengths: Option<Lengths>,
}

/// Pair lengths (prompt + longer completion, tokens) as `data.json` states them.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Lengths {
    /// Pairs measured.
    pub pairs: u64,
    /// Median.
    pub median: u64,
    /// 75th percentile.
    pub p75: u64,
    /// 90th percentile.
    pub p90: u64,
    /// Longest.
    pub max: u64,
    /// The limit.
    pub max_length: Option<u64>,
    /// Pairs within the limit.
    pub fitting: u64,
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
        let data_path = cell_dir.join("data.json");
        let data = if data_path.is_file() {
            let text = fs::read_to_string(&data_path).with_context(|| format!("reading {}", data_path.display()))?;
            Some(serde_json::from_str(&text).with_context(|| format!("parsing {}", data_path.display()))?)
        } else {
            None
        };
        cells.push(Cell { result, curve, data });
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

/// The metric whose per-item values are differences from the seed's SFT model.
const DRIFT: &str = "eval/chosen_logp_drift";
/// The per-item metric the drift is computed from.
const CHOSEN: &str = "eval/chosen_logp";
/// The bootstrap of every interval in the report (fixed seed: the same cells give the same
/// report).
const BOOTSTRAP: Bootstrap = Bootstrap { resamples: DEFAULT_RESAMPLES, level: 0.95, seed: 0 };

/// A cell's per-item values of `key`: its `items` when it has them, else its final value as
/// one item. The drift of an item is the cell's chosen log-prob of the item minus that of the
/// same model and seed's cell of its drift baseline (`sft`: the SFT variant it starts from, see
/// [`Layout::drift_base`]), when both have per-item values for the same pairs.
fn item_values(cell: &Cell, sft: Option<&Cell>, key: &str) -> Option<Vec<f64>> {
    let items = cell.result.items.as_ref();
    if key == DRIFT {
        let base = sft.and_then(|s| s.result.items.as_ref());
        if let (Some(items), Some(base)) = (items, base)
            && let (Some(a), Some(b)) = (items.values.get(CHOSEN), base.values.get(CHOSEN))
            && items.pairs == base.pairs
            && a.len() == b.len()
            && !a.is_empty()
        {
            return Some(a.iter().zip(b).map(|(x, y)| x - y).collect());
        }
    } else if let Some(v) = items.and_then(|i| i.values.get(key)).filter(|v| !v.is_empty()) {
        return Some(v.clone());
    }
    cell.result.r#final.get(key).map(|v| vec![*v])
}

/// The cells of one (model, variant), by seed.
fn row_cells<'a>(cells: &'a [Cell], model: &str, variant: &str) -> Vec<&'a Cell> {
    let mut rows: Vec<&Cell> =
        cells.iter().filter(|c| c.result.variant == variant && c.result.model == model).collect();
    rows.sort_by_key(|c| c.result.seed);
    rows
}

/// `values[seed][item]` of `key` for a row's cells (seeds without the metric left out), with
/// their seeds.
fn row_values(cells: &[Cell], layout: &Layout, rows: &[&Cell], key: &str) -> (Vec<u64>, Vec<Vec<f64>>) {
    let sft_of = |c: &Cell| {
        let base = layout.drift_base(&c.result.variant);
        cells
            .iter()
            .find(|s| s.result.variant == base && s.result.model == c.result.model && s.result.seed == c.result.seed)
    };
    rows.iter().filter_map(|c| item_values(c, sft_of(c), key).map(|v| (c.result.seed, v))).unzip()
}

/// A metric of one row: its interval, or why it has none.
#[derive(Debug, Clone, PartialEq)]
pub enum Estimate {
    /// Mean and 95% interval from at least two values.
    Interval(Interval),
    /// A single value (one seed, no per-item values): no interval.
    Single(f64),
}

impl Estimate {
    fn of(values: &[Vec<f64>]) -> Result<Option<Self>> {
        match values.iter().map(Vec::len).sum::<usize>() {
            0 => Ok(None),
            1 => Ok(Some(Self::Single(values.iter().flatten().copied().sum()))),
            _ => Ok(Some(Self::Interval(BOOTSTRAP.mean(values)?))),
        }
    }

    fn markdown(&self, signed: bool) -> String {
        let f = |x: f64| if signed { format!("{x:+.3}") } else { format!("{x:.3}") };
        match self {
            Self::Interval(i) => format!("{} [{}, {}]", f(i.mean), f(i.low), f(i.high)),
            Self::Single(x) => format!("{} (one value)", f(*x)),
        }
    }

    fn csv(&self) -> String {
        match self {
            Self::Interval(i) => format!("{},{},{}", i.mean, i.low, i.high),
            Self::Single(x) => format!("{x},,"),
        }
    }

    /// Resolved from 0: an interval that excludes 0 (a single value never is).
    fn resolved(&self) -> bool {
        matches!(self, Self::Interval(i) if i.excludes(0.0))
    }
}

/// The paired difference `variant - reference` of `key` on the seeds both rows have (the
/// reference's cells are `slime`; its name is `reference`), or why there is none.
fn paired(
    cells: &[Cell],
    layout: &Layout,
    variant: &[&Cell],
    (reference, slime): (&str, &[&Cell]),
    key: &str,
) -> Result<std::result::Result<Estimate, String>> {
    let (seeds_v, values_v) = row_values(cells, layout, variant, key);
    let (seeds_s, values_s) = row_values(cells, layout, slime, key);
    let shared: Vec<u64> = seeds_v.iter().copied().filter(|s| seeds_s.contains(s)).collect();
    if shared.is_empty() {
        return Ok(Err(format!("no seed in common with {reference}")));
    }
    let pick = |seeds: &[u64], values: &[Vec<f64>]| -> Vec<Vec<f64>> {
        shared.iter().filter_map(|s| seeds.iter().position(|x| x == s).map(|i| values[i].clone())).collect()
    };
    let (mut v, mut b) = (pick(&seeds_v, &values_v), pick(&seeds_s, &values_s));
    if v.iter().zip(&b).any(|(x, y)| x.len() != y.len()) {
        // One side has a single value per seed (no per-item values): compare seed means.
        if !(v.iter().all(|x| x.len() == 1) || b.iter().all(|y| y.len() == 1)) {
            return Ok(Err(format!("different held-out items from {reference}'s")));
        }
        let means = |rows: &[Vec<f64>]| -> Vec<Vec<f64>> {
            rows.iter().map(|r| vec![r.iter().sum::<f64>() / r.len() as f64]).collect()
        };
        (v, b) = (means(&v), means(&b));
    } else {
        let ids = |rows: &[&Cell]| -> Vec<Option<Vec<u64>>> {
            shared
                .iter()
                .map(|s| {
                    rows.iter()
                        .find(|c| c.result.seed == *s)
                        .and_then(|c| c.result.items.as_ref().map(|i| i.pairs.clone()))
                })
                .collect()
        };
        if ids(variant).iter().zip(ids(slime)).any(|(a, b)| matches!((a, b), (Some(a), Some(b)) if *a != b)) {
            return Ok(Err(format!("different held-out items from {reference}'s")));
        }
    }
    let n: usize = v.iter().map(Vec::len).sum();
    if n < 2 {
        let d = v.iter().flatten().sum::<f64>() - b.iter().flatten().sum::<f64>();
        return Ok(Ok(Estimate::Single(d)));
    }
    Ok(Ok(Estimate::Interval(BOOTSTRAP.paired_difference(&v, &b)?)))
}

/// The sentence on one paired difference of `variant` from `reference`.
fn difference_sentence(
    model: &str,
    (variant, reference): (&str, &str),
    header: &str,
    d: &std::result::Result<Estimate, String>,
) -> String {
    let what = format!("{model}, {variant} − {reference}, {header}");
    let than = if reference == SLIME { "SLIME".to_string() } else { format!("`{reference}`") };
    match d {
        Ok(e @ Estimate::Interval(i)) if e.resolved() => format!(
            "{what}: {} ({} than {than}; the 95% interval excludes 0)",
            e.markdown(true),
            if i.mean > 0.0 { "higher" } else { "lower" }
        ),
        Ok(e @ Estimate::Interval(_)) => {
            format!("{what}: {} (not resolved: the 95% interval includes 0)", e.markdown(true))
        }
        Ok(e @ Estimate::Single(_)) => format!("{what}: {} (not resolved: one value, no interval)", e.markdown(true)),
        Err(why) => format!("{what}: not compared ({why})"),
    }
}

/// The caption's data lines: per model, what the load of its cells read, cut and dropped, and
/// the pair lengths (from `data.json`; distinct summaries listed apart).
fn data_caption(cells: &[Cell]) -> String {
    let mut out = String::new();
    for model in models(cells) {
        let mut seen: Vec<&DataSummary> = Vec::new();
        for c in cells.iter().filter(|c| c.result.model == model) {
            if let Some(d) = &c.data
                && !seen.contains(&d)
            {
                seen.push(d);
            }
        }
        for d in seen {
            let _ = write!(
                out,
                "Data of {model}: {} ({} rows: {} SFT, {} preference, {} held-out pairs evaluated)",
                d.file, d.rows, d.sft_pairs, d.preference_pairs, d.eval_pairs
            );
            if let Some(l) = &d.lengths {
                let _ = write!(
                    out,
                    "; pair lengths (prompt + longer completion, tokens, before any cut): median {}, p75 {}, p90 {}, \
                     max {}",
                    l.median, l.p75, l.p90, l.max
                );
                match l.max_length {
                    Some(m) => {
                        let _ = write!(out, "; {} of {} pairs fit max_length {m}", l.fitting, l.pairs);
                    }
                    None => out.push_str("; no length limit"),
                }
            }
            let dropped: u64 = d.dropped_overlong.values().sum();
            match d.overlong.as_deref() {
                Some("drop") => {
                    let per: Vec<String> = d.dropped_overlong.iter().map(|(k, v)| format!("{k} {v}")).collect();
                    let _ = write!(
                        out,
                        "; dropped as too long (not cut): {dropped}{}; SFT pairs cut to fit: {}",
                        if per.is_empty() { String::new() } else { format!(" ({})", per.join(", ")) },
                        d.truncated_pairs
                    );
                }
                _ => {
                    let _ = write!(out, "; pairs cut to the length limits: {}", d.truncated_pairs);
                }
            }
            out.push_str(".\n\n");
        }
    }
    out
}

/// The report's Markdown (caption, table of intervals, paired differences from SLIME and the
/// list of resolved and unresolved differences) and the CSV of the table. Every metric is its
/// estimate (the mean over seeds of the per-seed item means) and 95% percentile-bootstrap
/// interval over seeds and held-out items ([`crate::stats`]); the paired differences bootstrap
/// the per-item differences on the seeds both rows have. `layout` gives the order of the rows,
/// each variant's drift baseline and the row it is compared with ([`Layout`]).
pub fn tables(cells: &[Cell], layout: &Layout) -> Result<(String, String)> {
    let order = &layout.order;
    let columns: Vec<(&str, &str)> =
        COLUMNS.into_iter().filter(|(key, _)| cells.iter().any(|c| c.result.r#final.contains_key(*key))).collect();
    let mut md = String::new();
    let has_sft_variants =
        cells.iter().any(|c| c.result.variant != crate::grid::SFT && layout.is_sft(&c.result.variant));
    let seeds_max = models(cells)
        .iter()
        .flat_map(|m| variant_order(cells, order).into_iter().map(move |v| (m.clone(), v)))
        .map(|(m, v)| row_cells(cells, &m, &v).len())
        .max()
        .unwrap_or(0);
    md.push_str(&format!(
        "Each metric: estimate [95% interval], percentile bootstrap ({DEFAULT_RESAMPLES} resamples) over seeds and, \
         within each seed, held-out items. Task accuracy, format validity and repetition are of greedy generations; \
         preference accuracy, chosen log-prob drift (against the seed's SFT model the variant starts from{}) and \
         the rejected-token collapse fraction (per held-out pair, averaged over pairs) are of the held-out pairs.{}\n\n",
        if has_sft_variants { "; for an SFT variant, against the NLL SFT model, the `sft` row" } else { "" },
        if seeds_max <= 1 {
            " With one seed the intervals cover item-to-item variation only, not seed-to-seed variation."
        } else {
            ""
        }
    ));
    if cells.iter().any(|c| c.result.items.is_none()) {
        md.push_str("Cells without per-item values (older results) count as one item per seed.\n\n");
    }
    md.push_str(&data_caption(cells));
    md.push_str("| model | variant | seeds |");
    let mut csv = String::from("model,variant,seeds");
    for &(key, header) in &columns {
        let _ = write!(md, " {header} |");
        let _ = write!(csv, ",{key}_mean,{key}_low,{key}_high");
    }
    md.push_str("\n|---|---|---|");
    md.push_str(&"---|".repeat(columns.len()));
    md.push('\n');
    csv.push('\n');
    let mut differences = String::new();
    let (mut resolved, mut unresolved) = (Vec::new(), Vec::new());
    for model in models(cells) {
        for variant in variant_order(cells, order) {
            let rows = row_cells(cells, &model, &variant);
            if rows.is_empty() {
                continue;
            }
            let reference = layout.reference(&variant).unwrap_or(SLIME);
            let slime = row_cells(cells, &model, reference);
            let seeds = rows.iter().map(|c| c.result.seed.to_string()).collect::<Vec<_>>().join(" ");
            let _ = write!(md, "| {model} | {variant} | {seeds} |");
            let _ = write!(csv, "{model},{variant},{seeds}");
            let compare = variant != reference && !slime.is_empty();
            if compare {
                let _ = write!(differences, "| {model} | {variant} | {reference} |");
            }
            for &(key, header) in &columns {
                match Estimate::of(&row_values(cells, layout, &rows, key).1)? {
                    Some(e) => {
                        let _ = write!(md, " {} |", e.markdown(false));
                        let _ = write!(csv, ",{}", e.csv());
                    }
                    None => {
                        md.push_str(" - |");
                        csv.push_str(",,,");
                    }
                }
                if compare {
                    let d = paired(cells, layout, &rows, (reference, &slime), key)?;
                    let has_values = !row_values(cells, layout, &rows, key).1.is_empty();
                    match &d {
                        Ok(e) if e.resolved() => {
                            let _ = write!(differences, " **{}** |", e.markdown(true));
                        }
                        Ok(e) => {
                            let _ = write!(differences, " {} |", e.markdown(true));
                        }
                        Err(_) => differences.push_str(" - |"),
                    }
                    if has_values {
                        let sentence = difference_sentence(&model, (&variant, reference), header, &d);
                        if matches!(&d, Ok(e) if e.resolved()) {
                            resolved.push(sentence);
                        } else {
                            unresolved.push(sentence);
                        }
                    }
                }
            }
            md.push('\n');
            csv.push('\n');
            if compare {
                differences.push('\n');
            }
        }
    }
    if !differences.is_empty() {
        md.push_str(
            "\nPaired differences from full SLIME (variant − SLIME) on the same seeds and held-out items, estimate \
             [95% interval]; **bold**: the interval excludes 0.",
        );
        if has_sft_variants {
            md.push_str(
                " An SFT variant other than `sft` is compared with `sft` instead (variant − sft: what its SFT objective \
                 changes against NLL).",
            );
        }
        md.push_str("\n\n| model | variant | compared with |");
        for &(_, header) in &columns {
            let _ = write!(md, " {header} |");
        }
        md.push_str("\n|---|---|---|");
        md.push_str(&"---|".repeat(columns.len()));
        md.push('\n');
        md.push_str(&differences);
        md.push_str("\nResolved by the intervals (the 95% interval of the difference excludes 0):\n\n");
        if resolved.is_empty() {
            md.push_str("- none\n");
        }
        for line in &resolved {
            let _ = writeln!(md, "- {line}");
        }
        md.push_str(
            "\nNot resolved (the interval includes 0, or there is no interval): these data do not tell the variant \
             from the row it is compared with on the metric:\n\n",
        );
        if unresolved.is_empty() {
            md.push_str("- none\n");
        }
        for line in &unresolved {
            let _ = writeln!(md, "- {line}");
        }
    }
    Ok((md, csv))
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
pub fn write_report(cells: &[Cell], layout: &Layout, out: &Path) -> Result<Vec<PathBuf>> {
    register_font();
    fs::create_dir_all(out.join("plots")).with_context(|| format!("creating {}", out.display()))?;
    let (md, csv) = tables(cells, layout)?;
    let mut written = Vec::new();
    for (name, text) in [("table.md", md), ("table.csv", csv)] {
        let path = out.join(name);
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    for (key, title, y_label, stem) in CURVES {
        let rows = panels(cells, &layout.order, key)?;
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
        Cell {
            result: CellResult { variant: variant.into(), seed, model: "tiny-llama".into(), r#final: fin, items: None },
            curve,
            data: None,
        }
    }

    /// A cell whose final metrics are the means of the given per-item values (pairs 0..n).
    fn item_cell(variant: &str, seed: u64, values: &[(&str, Vec<f64>)]) -> Cell {
        let mut c = cell(variant, seed, 0.0);
        c.result.r#final.clear();
        let mut items = Items::default();
        for (key, v) in values {
            c.result.r#final.insert(key.to_string(), v.iter().sum::<f64>() / v.len() as f64);
            items.values.insert(key.to_string(), v.clone());
            items.pairs = (0..v.len() as u64).collect();
        }
        c.result.items = Some(items);
        c
    }

    /// A layout of plain variants in this order.
    fn order(names: &[&str]) -> Layout {
        Layout { order: names.iter().map(|v| v.to_string()).collect(), ..Layout::default() }
    }

    #[test]
    fn table_rows_are_intervals_in_grid_order() -> Result<()> {
        let acc = "eval/preference_accuracy";
        // 40 items per seed, 30 of them right in seed 0 and 20 in seed 1.
        let mixed = |right: usize| (0..40).map(|i| if i < right { 1.0 } else { 0.0 }).collect::<Vec<f64>>();
        let cells = vec![
            item_cell("dpo", 0, &[(acc, mixed(30))]),
            item_cell("slime", 0, &[(acc, vec![1.0; 40])]),
            item_cell("slime", 1, &[(acc, vec![1.0; 40])]),
            item_cell("dpo", 1, &[(acc, mixed(20))]),
        ];
        let (md, csv) = tables(&cells, &order(&["slime", "dpo"]))?;
        assert!(md.contains("| model | variant | seeds | pref. acc. |\n"), "{md}");
        assert!(!md.contains("repetition |"), "a metric no cell reports has no column: {md}");
        let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| tiny-llama")).collect();
        // Constant items: an exact, zero-width interval.
        assert_eq!(rows[0], "| tiny-llama | slime | 0 1 | 1.000 [1.000, 1.000] |", "{md}");
        // The interval is the stats module's nested bootstrap of the same values.
        let i = BOOTSTRAP.mean(&[mixed(30), mixed(20)])?;
        assert!((i.mean - 0.625).abs() < 1e-12);
        assert_eq!(rows[1], format!("| tiny-llama | dpo | 0 1 | 0.625 [{:.3}, {:.3}] |", i.low, i.high), "{md}");
        assert!(i.low < 0.6 && i.high > 0.65, "two seeds 0.25 apart widen the interval: {i:?}");
        assert!(csv.lines().nth(1).is_some_and(|l| l == "tiny-llama,slime,0 1,1,1,1"), "{csv}");
        assert!(csv.starts_with("model,variant,seeds,eval/preference_accuracy_mean,eval/preference_accuracy_low,"));
        Ok(())
    }

    #[test]
    fn paired_differences_say_which_the_intervals_resolve() -> Result<()> {
        let acc = "eval/preference_accuracy";
        let fmt = "eval/format_validity";
        let noisy = |seed: u64| (0..60).map(|i| ((i * 7 + seed as usize * 3) % 10) as f64 / 10.0).collect::<Vec<f64>>();
        let mut cells = Vec::new();
        for seed in 0..3 {
            cells.push(item_cell("slime", seed, &[(acc, vec![1.0; 60]), (fmt, noisy(seed))]));
            // Always wrong where SLIME is right: -1 exactly, resolved. Format: the same items
            // as SLIME's: 0 exactly, not resolved.
            cells.push(item_cell("dpo", seed, &[(acc, vec![0.0; 60]), (fmt, noisy(seed))]));
        }
        // SimPO on seed 0 only, and without per-item values: one value, no interval.
        let mut simpo = cell("simpo", 0, 0.9);
        simpo.result.r#final.insert(fmt.into(), 0.5);
        cells.push(simpo);
        let (md, _) = tables(&cells, &order(&["slime", "dpo", "simpo"]))?;
        assert!(
            md.contains("| tiny-llama | dpo | slime | **-1.000 [-1.000, -1.000]** | +0.000 [+0.000, +0.000] |"),
            "{md}"
        );
        let resolved = md.split("Resolved by the intervals").nth(1).context("resolved list")?;
        let (resolved, unresolved) = resolved.split_once("Not resolved").context("unresolved list")?;
        assert!(
            resolved.contains(
                "- tiny-llama, dpo − slime, pref. acc.: -1.000 [-1.000, -1.000] (lower than SLIME; the 95% interval \
                 excludes 0)"
            ),
            "{md}"
        );
        assert!(!resolved.contains("format valid"), "{md}");
        assert!(
            unresolved.contains(
                "- tiny-llama, dpo − slime, format valid: +0.000 [+0.000, +0.000] (not resolved: the 95% interval \
                 includes 0)"
            ),
            "{md}"
        );
        assert!(
            unresolved.contains(
                "- tiny-llama, simpo − slime, pref. acc.: -0.100 (one value) (not resolved: one value, no interval)"
            ),
            "{md}"
        );
        assert!(md.contains("| tiny-llama | simpo | 0 | 0.900 (one value) | 0.500 (one value) |"), "{md}");
        // Format: 0.5 against SLIME's seed-0 mean of 0.45.
        assert!(md.contains("| tiny-llama | simpo | slime | -0.100 (one value) | +0.050 (one value) |"), "{md}");
        assert!(md.contains("Cells without per-item values"), "{md}");
        Ok(())
    }

    #[test]
    fn a_shifted_variant_is_resolved_only_when_the_shift_beats_the_noise() -> Result<()> {
        let key = "eval/chosen_logp";
        let base =
            |seed: u64| (0..80).map(|i| -1.0 - ((i * 13 + seed as usize) % 17) as f64 / 10.0).collect::<Vec<f64>>();
        let shifted = |seed: u64, by: f64, noise: f64| {
            base(seed).iter().enumerate().map(|(i, x)| x + by + noise * if i % 2 == 0 { 1.0 } else { -1.0 }).collect()
        };
        let mut cells = Vec::new();
        for seed in 0..2 {
            cells.push(item_cell("slime", seed, &[(key, base(seed))]));
            // +0.05 with +-0.5 noise per item: not resolved; +0.5 with the same noise: resolved.
            cells.push(item_cell("small", seed, &[(key, shifted(seed, 0.05, 0.5))]));
            cells.push(item_cell("large", seed, &[(key, shifted(seed, 0.5, 0.5))]));
        }
        let ci = |variant: &str| -> Result<Interval> {
            let rows = row_cells(&cells, "tiny-llama", variant);
            let slime = row_cells(&cells, "tiny-llama", "slime");
            match paired(&cells, &Layout::default(), &rows, ("slime", &slime), key)? {
                Ok(Estimate::Interval(i)) => Ok(i),
                other => bail!("{other:?}"),
            }
        };
        let (small, large) = (ci("small")?, ci("large")?);
        assert!((small.mean - 0.05).abs() < 1e-9 && !small.excludes(0.0), "{small:?}");
        assert!((large.mean - 0.5).abs() < 1e-9 && large.excludes(0.0), "{large:?}");
        Ok(())
    }

    #[test]
    fn drift_is_per_item_against_the_seeds_sft_model() -> Result<()> {
        let chosen = "eval/chosen_logp";
        let mut sft = item_cell("sft", 0, &[(chosen, vec![-1.0, -2.0, -3.0])]);
        sft.result.r#final.insert(DRIFT.into(), 0.0);
        let mut slime = item_cell("slime", 0, &[(chosen, vec![-1.5, -2.5, -3.5])]);
        slime.result.r#final.insert(DRIFT.into(), -0.5);
        let mut dpo = item_cell("dpo", 0, &[(chosen, vec![-2.0, -2.0, -6.0])]);
        dpo.result.r#final.insert(DRIFT.into(), -1.0);
        let cells = vec![sft, slime, dpo];
        let (md, _) = tables(&cells, &order(&["sft", "slime", "dpo"]))?;
        assert!(md.contains("| tiny-llama | sft | 0 | 0.000 [0.000, 0.000] |"), "{md}");
        assert!(md.contains("| tiny-llama | slime | 0 | -0.500 [-0.500, -0.500] |"), "{md}");
        let dpo_drift = BOOTSTRAP.mean(&[vec![-1.0, 0.0, -3.0]])?;
        assert!(
            md.contains(&format!("| -1.333 [{:.3}, {:.3}] |", dpo_drift.low, dpo_drift.high)),
            "drift items are -1, 0, -3: {md}"
        );
        // Different held-out items than the SFT cell's: the drift falls back to the run's value.
        let mut other = cells.clone();
        if let Some(items) = other[2].result.items.as_mut() {
            items.pairs = vec![7, 8, 9];
        }
        let (md, _) = tables(&other, &Layout::default())?;
        assert!(md.contains("| -1.000 (one value) |"), "{md}");
        Ok(())
    }

    #[test]
    fn an_sft_variant_is_compared_with_sft_and_its_preference_cells_drift_from_it() -> Result<()> {
        let chosen = "eval/chosen_logp";
        let with_drift = |variant: &str, values: Vec<f64>| {
            let mut c = item_cell(variant, 0, &[(chosen, values)]);
            c.result.r#final.insert(DRIFT.into(), 0.0);
            c
        };
        let cells = vec![
            with_drift("sft", vec![-1.0, -2.0, -3.0]),
            with_drift("sft-minus-p", vec![-2.0, -2.0, -2.0]),
            with_drift("slime", vec![-1.5, -2.5, -3.5]),
            with_drift("slime-after", vec![-2.5, -2.0, -1.0]),
        ];
        let layout = Layout {
            order: ["sft", "sft-minus-p", "slime", "slime-after"].map(String::from).to_vec(),
            sft_variants: ["sft-minus-p".to_string()].into_iter().collect(),
            starts: [("slime-after".to_string(), "sft-minus-p".to_string())].into_iter().collect(),
        };
        let (md, _) = tables(&cells, &layout)?;
        // sft-minus-p against the NLL SFT model: -1, 0, +1; slime-after against sft-minus-p:
        // -0.5, 0, +1.
        let of = |v: Vec<f64>| BOOTSTRAP.mean(&[v]);
        let (p, after) = (of(vec![-1.0, 0.0, 1.0])?, of(vec![-0.5, 0.0, 1.0])?);
        assert!(
            md.contains(&format!("| tiny-llama | sft-minus-p | 0 | 0.000 [{:.3}, {:.3}] |", p.low, p.high)),
            "{md}"
        );
        assert!(
            md.contains(&format!("| tiny-llama | slime-after | 0 | 0.167 [{:.3}, {:.3}] |", after.low, after.high))
        );
        assert!(md.contains("for an SFT variant, against the NLL SFT model"), "{md}");
        assert!(md.contains("| tiny-llama | sft-minus-p | sft |"), "{md}");
        assert!(md.contains("| tiny-llama | slime-after | slime |"), "{md}");
        assert!(md.contains("| tiny-llama | sft | slime |"), "{md}");
        assert!(md.contains("tiny-llama, sft-minus-p − sft, chosen logp drift"), "{md}");
        Ok(())
    }

    #[test]
    fn the_caption_states_lengths_and_what_was_dropped() -> Result<()> {
        let mut c = cell("slime", 0, 0.5);
        c.data = Some(DataSummary {
            file: "pairs.parquet".into(),
            rows: 300,
            sft_pairs: 90,
            preference_pairs: 150,
            eval_pairs: 20,
            truncated_pairs: 12,
            overlong: Some("drop".into()),
            dropped_overlong: [("preference".to_string(), 25), ("held-out".to_string(), 3)].into_iter().collect(),
            lengths: Some(Lengths {
                pairs: 300,
                median: 588,
                p75: 1125,
                p90: 1579,
                max: 3548,
                max_length: Some(1024),
                fitting: 210,
            }),
        });
        let (md, _) = tables(&[c], &Layout::default())?;
        assert!(
            md.contains(
                "Data of tiny-llama: pairs.parquet (300 rows: 90 SFT, 150 preference, 20 held-out pairs evaluated); \
                 pair lengths (prompt + longer completion, tokens, before any cut): median 588, p75 1125, p90 1579, \
                 max 3548; 210 of 300 pairs fit max_length 1024; dropped as too long (not cut): 28 (held-out 3, \
                 preference 25); SFT pairs cut to fit: 12."
            ),
            "{md}"
        );
        assert!(md.contains("With one seed the intervals cover item-to-item variation only"), "{md}");
        Ok(())
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
        let files = write_report(&cells, &Layout::default(), dir.path())?;
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
