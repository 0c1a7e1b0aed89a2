//! The ablation grid: its variants in report order, each one's `[preference]` objective and
//! options, and the SFT variants whose models they start from, read from TOML. The default grid
//! is `xtask/grids/default.toml`, compiled in, so no file needs to be present at run time.
//!
//! Two kinds of variant: an **SFT variant** (no `objective`) is an SFT cell per seed, the SFT
//! stage only, with its own `[sft]` options (`sft` is the NLL one every other variant starts
//! from by default); a **preference variant** (an `objective`) is a preference cell per seed,
//! starting from the model of the SFT variant its `start` names (default `sft`), with its own
//! `[preference]` options.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// The default grid's text.
pub const DEFAULT_TOML: &str = include_str!("../grids/default.toml");

/// The SFT variant every preference variant starts from unless it names another: NLL SFT.
pub const SFT: &str = "sft";

/// The preference variant every other preference variant is compared with.
pub const SLIME: &str = "slime";

/// Keys a variant's `sft` (the first two) or `preference` table may not set: the grid sets them
/// (`steps` from `--steps` / `--sft-steps`, the preference objective from `objective`).
const RESERVED: [&str; 3] = ["steps", "max_steps", "objective"];

/// A grid of variants.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grid {
    /// The variants the tiny Gemma runs when the default grid covers both tiny models.
    pub tiny_gemma_default: Vec<String>,
    /// Every variant, in report order (`[[variant]]` tables).
    #[serde(rename = "variant")]
    pub variants: Vec<Variant>,
}

/// One variant: a name, the objective its cells train with (none: an SFT variant), and the
/// options of its stage.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    /// Cell and report name, e.g. `slime-no-anchor`.
    pub name: String,
    /// The `[preference]` objective table (`type = "..."` and its parameters); `None` for an
    /// SFT variant.
    pub objective: Option<toml::Table>,
    /// Preference variants: the SFT variant whose model (and end evaluation) the cells start
    /// from (default `sft`).
    #[serde(default)]
    pub start: Option<String>,
    /// Preference variants: further `[preference]` keys, e.g. `selection = "sage"`.
    #[serde(default)]
    pub preference: Option<toml::Table>,
    /// SFT variants: further `[sft]` keys, e.g. `objective = { type = "sft", alpha = 1.0 }`.
    #[serde(default)]
    pub sft: Option<toml::Table>,
}

impl Variant {
    /// An SFT variant: its cells are the SFT stage only.
    pub fn is_sft(&self) -> bool {
        self.objective.is_none()
    }

    /// The SFT variant a preference variant starts from (an SFT variant: itself).
    pub fn start(&self) -> &str {
        if self.is_sft() { &self.name } else { self.start.as_deref().unwrap_or(SFT) }
    }

    /// The objective as an inline TOML table with `type` first, as a run config's
    /// `objective = ...` line takes it (empty for an SFT variant).
    pub fn objective_inline(&self) -> String {
        self.objective.as_ref().map_or_else(String::new, inline_table)
    }

    /// The variant's own lines of its stage's section (`[sft]` for an SFT variant,
    /// `[preference]` otherwise), `key = value` each (tables inline, `type` first), as (key,
    /// line).
    pub fn stage_lines(&self) -> Vec<(String, String)> {
        let table = if self.is_sft() { &self.sft } else { &self.preference };
        table.iter().flatten().map(|(k, v)| (k.clone(), format!("{k} = {}", inline_value(v)))).collect()
    }
}

/// A TOML value as written inline, a table's `type` key first.
fn inline_value(value: &toml::Value) -> String {
    match value {
        toml::Value::Table(t) => inline_table(t),
        other => other.to_string(),
    }
}

/// A TOML table as an inline table, its `type` key first.
fn inline_table(table: &toml::Table) -> String {
    let tag = table.get("type").into_iter().map(|v| ("type", v));
    let rest = table.iter().filter(|(k, _)| k.as_str() != "type").map(|(k, v)| (k.as_str(), v));
    let fields: Vec<String> = tag.chain(rest).map(|(k, v)| format!("{k} = {}", inline_value(v))).collect();
    format!("{{ {} }}", fields.join(", "))
}

/// What the report needs of a grid: the variants in report order, which are SFT variants and
/// which SFT variant each preference variant starts from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Layout {
    /// Variant names in report order.
    pub order: Vec<String>,
    /// SFT variants other than `sft`.
    pub sft_variants: BTreeSet<String>,
    /// Preference variants whose start is not `sft`, with their start.
    pub starts: BTreeMap<String, String>,
}

impl Layout {
    /// Whether `variant` is an SFT variant (`sft` or another of the grid's).
    pub fn is_sft(&self, variant: &str) -> bool {
        variant == SFT || self.sft_variants.contains(variant)
    }

    /// The SFT variant whose cell of the same model and seed is `variant`'s drift baseline:
    /// the model a preference variant starts from; for an SFT variant, the NLL `sft` model.
    pub fn drift_base<'a>(&'a self, variant: &str) -> &'a str {
        if self.is_sft(variant) { SFT } else { self.starts.get(variant).map_or(SFT, String::as_str) }
    }

    /// The variant `variant` is compared with in the paired differences: `slime` for a
    /// preference variant and for `sft` (what the preference stage changes), `sft` for another
    /// SFT variant (what its SFT objective changes); `None` for `slime` itself.
    pub fn reference(&self, variant: &str) -> Option<&'static str> {
        match variant {
            SLIME => None,
            v if self.is_sft(v) && v != SFT => Some(SFT),
            _ => Some(SLIME),
        }
    }
}

impl Grid {
    /// Parses and checks a grid; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let grid: Self = toml::from_str(text).with_context(|| format!("{origin}: not a valid grid"))?;
        grid.check().with_context(|| format!("{origin}: invalid grid"))?;
        Ok(grid)
    }

    /// The compiled-in default grid.
    pub fn default_grid() -> Result<Self> {
        Self::parse(DEFAULT_TOML, "xtask/grids/default.toml")
    }

    /// Variant names in report order.
    pub fn names(&self) -> Vec<&str> {
        self.variants.iter().map(|v| v.name.as_str()).collect()
    }

    /// The variant called `name`.
    pub fn get(&self, name: &str) -> Option<&Variant> {
        self.variants.iter().find(|v| v.name == name)
    }

    /// The report's view of the grid.
    pub fn layout(&self) -> Layout {
        Layout {
            order: self.names().into_iter().map(String::from).collect(),
            sft_variants: self
                .variants
                .iter()
                .filter(|v| v.is_sft() && v.name != SFT)
                .map(|v| v.name.clone())
                .collect(),
            starts: self
                .variants
                .iter()
                .filter(|v| !v.is_sft() && v.start() != SFT)
                .map(|v| (v.name.clone(), v.start().to_string()))
                .collect(),
        }
    }

    /// Names unique; `sft` present as a plain SFT variant; SFT variants with `sft` options
    /// only, preference variants with an objective whose `type` is a string, `preference`
    /// options only and a `start` that names an SFT variant; no options table setting what the
    /// grid sets; `tiny_gemma_default` naming variants of the grid.
    fn check(&self) -> Result<()> {
        let mut seen = BTreeSet::new();
        for (i, v) in self.variants.iter().enumerate() {
            if !seen.insert(v.name.as_str()) {
                bail!("variant {} (`{}`): the name is used twice", i + 1, v.name);
            }
        }
        if !seen.contains(SFT) {
            bail!("the grid needs a variant named `{SFT}`: every other variant starts from its model by default");
        }
        for v in &self.variants {
            let name = &v.name;
            match &v.objective {
                None if name == SFT && (v.sft.is_some() || v.preference.is_some() || v.start.is_some()) => {
                    bail!("variant `{SFT}` is the plain NLL SFT stage; give other SFT settings a variant of their own")
                }
                None if name != SFT && v.sft.is_none() => bail!(
                    "variant `{name}` needs an `objective` table (e.g. {{ type = \"slime\" }}), or, as an SFT \
                     variant, its own `sft` settings"
                ),
                None if v.preference.is_some() || v.start.is_some() => bail!(
                    "variant `{name}` has no objective, so it is an SFT variant: `preference` and `start` belong to \
                     preference variants"
                ),
                Some(_) if name == SFT => bail!("variant `{SFT}` trains with SFT; remove its `objective`"),
                Some(o) if !o.get("type").is_some_and(toml::Value::is_str) => {
                    bail!("variant `{name}`: its objective needs `type = \"<objective name>\"`")
                }
                Some(_) if v.sft.is_some() => bail!(
                    "variant `{name}`: a preference variant takes its SFT model from `start`; put the `sft` settings \
                     in an SFT variant (a variant without objective) and name it in `start`"
                ),
                Some(_) => {
                    let start = v.start();
                    if !self.get(start).is_some_and(Variant::is_sft) {
                        bail!("variant `{name}`: start = `{start}` is not an SFT variant of the grid");
                    }
                }
                None => {}
            }
            let (section, table, reserved) =
                if v.is_sft() { ("sft", &v.sft, &RESERVED[..2]) } else { ("preference", &v.preference, &RESERVED[..]) };
            if let Some(key) = table.iter().flatten().map(|(k, _)| k).find(|k| reserved.contains(&k.as_str())) {
                let by = if key == "objective" { "the variant's `objective`" } else { "--steps / --sft-steps" };
                bail!("variant `{name}`: `{section}.{key}` is set by the grid ({by})");
            }
        }
        if let Some(unknown) = self.tiny_gemma_default.iter().find(|n| !seen.contains(n.as_str())) {
            bail!("tiny_gemma_default names `{unknown}`, which is not a variant of the grid");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_grid_parses_with_sft_first_and_inline_objectives() -> Result<()> {
        let grid = Grid::default_grid()?;
        assert_eq!(grid.names().first(), Some(&SFT));
        assert_eq!(grid.variants.len(), 19);
        let inline = |name: &str| grid.get(name).map(Variant::objective_inline);
        assert_eq!(inline("sft").as_deref(), Some(""));
        assert_eq!(inline("slime").as_deref(), Some(r#"{ type = "slime" }"#));
        assert_eq!(inline("slime-p1.0").as_deref(), Some(r#"{ type = "slime", p = 1.0 }"#));
        assert_eq!(inline("slime-authors-code").as_deref(), Some(r#"{ type = "slime", preset = "authors-code" }"#));
        let lines = |name: &str| grid.get(name).map(Variant::stage_lines).unwrap_or_default();
        assert_eq!(lines("slime-sage"), [("selection".to_string(), r#"selection = "sage""#.to_string())]);
        assert_eq!(
            lines("sft-minus-p"),
            [("objective".to_string(), r#"objective = { type = "sft", alpha = 1.0 }"#.to_string())]
        );
        let layout = grid.layout();
        assert!(layout.is_sft("sft") && layout.is_sft("sft-minus-p") && !layout.is_sft("slime"));
        assert_eq!(layout.drift_base("slime-after-sft-minus-p"), "sft-minus-p");
        assert_eq!(layout.drift_base("sft-minus-p"), SFT, "an SFT variant drifts from the NLL SFT model");
        assert_eq!(layout.drift_base("dpo"), SFT);
        assert_eq!(
            ["sft", "sft-minus-p", "slime", "dpo"].map(|v| layout.reference(v)),
            [Some(SLIME), Some(SFT), None, Some(SLIME)]
        );
        Ok(())
    }

    #[test]
    fn bad_grids_are_rejected_with_the_reason() {
        for (text, needle) in [
            ("tiny_gemma_default = []\n[[variant]]\nname = \"slime\"\nobjective = { type = \"slime\" }", "`sft`"),
            ("tiny_gemma_default = []\n[[variant]]\nname = \"sft\"\n[[variant]]\nname = \"sft\"", "twice"),
            ("tiny_gemma_default = []\n[[variant]]\nname = \"sft\"\n[[variant]]\nname = \"dpo\"", "`dpo` needs"),
            ("tiny_gemma_default = []\n[[variant]]\nname = \"sft\"\nobjective = { type = \"dpo\" }", "remove"),
            (
                "tiny_gemma_default = []\n[[variant]]\nname = \"sft\"\n[[variant]]\nname = \"x\"\nobjective = { beta = 1 }",
                "type",
            ),
            ("tiny_gemma_default = [\"kto\"]\n[[variant]]\nname = \"sft\"", "kto"),
            ("tiny_gemma_default = []\n[[variant]]\nname = \"sft\"\nsteps = 3", "steps"),
            ("tiny_gemma_default = []\n[[variant]]\nname = \"sft\"\nsft = { steps = 3 }", "own"),
            (
                "tiny_gemma_default = []\n[[variant]]\nname = \"sft\"\n[[variant]]\nname = \"p\"\nsft = { steps = 3 }",
                "`sft.steps`",
            ),
            (
                "tiny_gemma_default = []\n[[variant]]\nname = \"sft\"\n[[variant]]\nname = \"p\"\nstart = \"sft\"",
                "SFT variant",
            ),
            (
                "tiny_gemma_default = []\n[[variant]]\nname = \"sft\"\n[[variant]]\nname = \"x\"\n\
                 objective = { type = \"dpo\" }\nstart = \"y\"",
                "`y`",
            ),
            (
                "tiny_gemma_default = []\n[[variant]]\nname = \"sft\"\n[[variant]]\nname = \"x\"\n\
                 objective = { type = \"dpo\" }\nstart = \"x\"",
                "not an SFT variant",
            ),
            (
                "tiny_gemma_default = []\n[[variant]]\nname = \"sft\"\n[[variant]]\nname = \"x\"\n\
                 objective = { type = \"dpo\" }\nsft = { batch_size = 2 }",
                "start",
            ),
            (
                "tiny_gemma_default = []\n[[variant]]\nname = \"sft\"\n[[variant]]\nname = \"x\"\n\
                 objective = { type = \"dpo\" }\npreference = { objective = { type = \"ipo\" } }",
                "`preference.objective`",
            ),
        ] {
            let err = format!("{:#}", Grid::parse(text, "grid.toml").expect_err(text));
            assert!(err.contains("grid.toml") && err.contains(needle), "{text}: `{err}` should mention `{needle}`");
        }
    }
}
