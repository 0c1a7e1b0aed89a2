//! The ablation grid: its variants in report order and each one's `[preference]` objective,
//! read from TOML. The default grid is `xtask/grids/default.toml`, compiled in, so no file
//! needs to be present at run time.

use std::collections::BTreeSet;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// The default grid's text.
pub const DEFAULT_TOML: &str = include_str!("../grids/default.toml");

/// The variant that trains each seed's starting model; it has no preference objective.
pub const SFT: &str = "sft";

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

/// One variant: a name and the objective its cells train with.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    /// Cell and report name, e.g. `slime-no-anchor`.
    pub name: String,
    /// The `[preference]` objective table (`type = "..."` and its parameters); `None` for `sft`.
    pub objective: Option<toml::Table>,
}

impl Variant {
    /// The objective as an inline TOML table with `type` first, as a run config's
    /// `objective = ...` line takes it (empty for `sft`).
    pub fn objective_inline(&self) -> String {
        let Some(table) = &self.objective else { return String::new() };
        let tag = table.get("type").into_iter().map(|v| ("type", v));
        let rest = table.iter().filter(|(k, _)| k.as_str() != "type").map(|(k, v)| (k.as_str(), v));
        let fields: Vec<String> = tag.chain(rest).map(|(k, v)| format!("{k} = {v}")).collect();
        format!("{{ {} }}", fields.join(", "))
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

    /// Names unique, `sft` present without an objective, every other variant with an objective
    /// whose `type` is a string, and `tiny_gemma_default` naming variants of the grid.
    fn check(&self) -> Result<()> {
        let mut seen = BTreeSet::new();
        for (i, v) in self.variants.iter().enumerate() {
            if !seen.insert(v.name.as_str()) {
                bail!("variant {} (`{}`): the name is used twice", i + 1, v.name);
            }
            match (&v.objective, v.name == SFT) {
                (Some(_), true) => bail!("variant `{SFT}` trains with SFT; remove its `objective`"),
                (None, false) => bail!("variant `{}` needs an `objective` table (e.g. {{ type = \"slime\" }})", v.name),
                (Some(o), false) if !o.get("type").is_some_and(toml::Value::is_str) => {
                    bail!("variant `{}`: its objective needs `type = \"<objective name>\"`", v.name)
                }
                _ => {}
            }
        }
        if !seen.contains(SFT) {
            bail!("the grid needs a variant named `{SFT}`: every other variant starts from its model");
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
        assert_eq!(grid.variants.len(), 16);
        let inline = |name: &str| grid.get(name).map(Variant::objective_inline);
        assert_eq!(inline("sft").as_deref(), Some(""));
        assert_eq!(inline("slime").as_deref(), Some(r#"{ type = "slime" }"#));
        assert_eq!(inline("slime-p1.0").as_deref(), Some(r#"{ type = "slime", p = 1.0 }"#));
        assert_eq!(inline("slime-authors-code").as_deref(), Some(r#"{ type = "slime", preset = "authors-code" }"#));
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
        ] {
            let err = format!("{:#}", Grid::parse(text, "grid.toml").expect_err(text));
            assert!(err.contains("grid.toml") && err.contains(needle), "{text}: `{err}` should mention `{needle}`");
        }
    }
}
