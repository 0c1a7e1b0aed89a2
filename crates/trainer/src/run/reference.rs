//! Reference log-probs for DPO-style objectives: each preference pair's sums `(S_w, S_l)` under
//! the starting model ([`score_pairs`]), read from a file, computed before the stage, or
//! computed on demand.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use slime_data::{PairLogps, TokenizedPair, read_logps, write_logps};
use slime_models::CausalLm;
use slime_objectives::ReferenceLogps;

use crate::config::RunConfig;
use crate::corpus::RunData;
use crate::logps::score_pairs;
use crate::{Result, TrainError};

/// Where a run's reference log-probs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ReferenceSource {
    /// `preference.reference_logps`, read before the stage.
    File,
    /// Computed for the whole split from the starting model before the stage (full
    /// fine-tuning: the weights change, so it cannot wait).
    Eager,
    /// With LoRA: computed for each pair when it is first needed, with the adapters off (which
    /// is exactly the starting model, at any step), as TRL does with a PEFT model.
    OnDemand,
}

impl ReferenceSource {
    pub(super) fn of(cfg: &RunConfig) -> Self {
        match (&cfg.preference.reference_logps, &cfg.model.lora) {
            (Some(_), _) => Self::File,
            (None, Some(_)) => Self::OnDemand,
            (None, None) => Self::Eager,
        }
    }
}

/// The reference sums of a run's preference pairs by pair id (see [`ReferenceSource`]).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Reference {
    source: ReferenceSource,
    sums: HashMap<u64, (f64, f64)>,
}

impl Reference {
    /// The reference before a fresh stage: read and checked, computed for the whole split, or
    /// empty until [`Reference::ensure`] fills it.
    pub(super) fn at_start(lm: &CausalLm, data: &RunData, cfg: &RunConfig) -> Result<Self> {
        let source = ReferenceSource::of(cfg);
        let rows = match (&cfg.preference.reference_logps, source) {
            (Some(path), _) => read_checked(path, data)?,
            (None, ReferenceSource::OnDemand) => Vec::new(),
            (None, _) => {
                let all: Vec<&TokenizedPair> = data.preference.iter().map(|e| &e.tokens).collect();
                score_pairs(lm, &all, cfg.eval.batch_size, false)?.0
            }
        };
        Ok(Self { source, sums: rows.into_iter().map(|r| (r.pair, (r.chosen_logp, r.rejected_logp))).collect() })
    }

    /// The reference a checkpoint holds: `(pair id, S_w bits, S_l bits)` ([`Reference::to_bits`]).
    pub(super) fn from_bits(cfg: &RunConfig, bits: Vec<(u64, u64, u64)>) -> Self {
        let sums = bits.into_iter().map(|(id, c, r)| (id, (f64::from_bits(c), f64::from_bits(r)))).collect();
        Self { source: ReferenceSource::of(cfg), sums }
    }

    /// The sums as exact bit patterns, sorted by pair id (a checkpoint's form).
    pub(super) fn to_bits(&self) -> Vec<(u64, u64, u64)> {
        let mut bits: Vec<(u64, u64, u64)> =
            self.sums.iter().map(|(&id, &(c, r))| (id, c.to_bits(), r.to_bits())).collect();
        bits.sort_unstable();
        bits
    }

    /// On demand only: computes the sums of `pairs` not known yet, with the adapters off.
    pub(super) fn ensure(&mut self, lm: &CausalLm, pairs: &[&TokenizedPair], batch_size: usize) -> Result<()> {
        if self.source != ReferenceSource::OnDemand {
            return Ok(());
        }
        let mut missing: Vec<&TokenizedPair> =
            pairs.iter().copied().filter(|t| !self.sums.contains_key(&t.id)).collect();
        missing.sort_by_key(|t| t.id);
        missing.dedup_by_key(|t| t.id);
        if missing.is_empty() {
            return Ok(());
        }
        lm.set_adapters_enabled(false);
        let rows = score_pairs(lm, &missing, batch_size, false);
        lm.set_adapters_enabled(true);
        for r in rows?.0 {
            self.sums.insert(r.pair, (r.chosen_logp, r.rejected_logp));
        }
        Ok(())
    }

    /// The sums of pair `id`, if known.
    pub(super) fn get(&self, id: u64) -> Option<(f64, f64)> {
        self.sums.get(&id).copied()
    }

    /// The reference of a batch's pairs, in order.
    pub(super) fn for_pairs(&self, ids: &[u64], device: &Device) -> Result<ReferenceLogps> {
        let (c, r): (Vec<f64>, Vec<f64>) = ids
            .iter()
            .map(|id| self.get(*id).ok_or_else(|| TrainError::Config(format!("no reference log-probs for pair {id}"))))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .unzip();
        Ok(ReferenceLogps::new(&Tensor::new(c, device)?, &Tensor::new(r, device)?)?)
    }

    /// Writes the sums the run computed to `reference_logps.parquet` (sorted by pair), for reuse
    /// as `preference.reference_logps`; nothing when they came from such a file.
    pub(super) fn write_cache(&self, run_dir: &Path, data: &RunData) -> Result<()> {
        if self.source == ReferenceSource::File {
            return Ok(());
        }
        let mut rows: Vec<PairLogps> = data
            .preference
            .iter()
            .filter_map(|e| {
                let t = &e.tokens;
                self.get(t.id).map(|(c, r)| PairLogps {
                    pair: t.id,
                    chosen_logp: c,
                    rejected_logp: r,
                    chosen_tokens: t.chosen.len() as u32,
                    rejected_tokens: t.rejected.len() as u32,
                })
            })
            .collect();
        rows.sort_by_key(|r| r.pair);
        crate::atomic::produce_file(&run_dir.join("reference_logps.parquet"), |tmp| Ok(write_logps(tmp, &rows)?))
    }
}

/// The rows of a reference file; every preference pair must be there with its token counts.
fn read_checked(path: &Path, data: &RunData) -> Result<Vec<PairLogps>> {
    let rows = read_logps(path)?;
    let by_id: HashMap<u64, &PairLogps> = rows.iter().map(|r| (r.pair, r)).collect();
    for e in &data.preference {
        let t = &e.tokens;
        let Some(r) = by_id.get(&t.id) else {
            return Err(TrainError::Config(format!(
                "{}: no reference log-probs for pair {} (row {} of the data); compute them with \
                 `slime-trainer logps` on the same data file",
                path.display(),
                t.id,
                t.id
            )));
        };
        if (r.chosen_tokens as usize, r.rejected_tokens as usize) != (t.chosen.len(), t.rejected.len()) {
            return Err(TrainError::Config(format!(
                "{}: pair {} has {}/{} chosen/rejected tokens there but {}/{} here; the file was scored \
                 with another tokenizer, template or max_length",
                path.display(),
                t.id,
                r.chosen_tokens,
                r.rejected_tokens,
                t.chosen.len(),
                t.rejected.len()
            )));
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use slime_models::LoraConfig;

    use super::*;
    use crate::config::LoraSpec;
    use crate::run::tiny_llama;

    fn pairs(data: &RunData) -> Vec<&TokenizedPair> {
        data.preference.iter().map(|e| &e.tokens).collect()
    }

    /// Whether `a` and `b` hold the same pairs with sums within 1e-4 (batches pad differently).
    fn close(a: &[(u64, f64, f64)], b: &[PairLogps]) -> bool {
        a.len() == b.len()
            && a.iter().zip(b).all(|(&(id, c, r), row)| {
                id == row.pair && (c - row.chosen_logp).abs() < 1e-4 && (r - row.rejected_logp).abs() < 1e-4
            })
    }

    #[test]
    fn the_source_follows_the_config() {
        let mut cfg = RunConfig::default();
        assert_eq!(ReferenceSource::of(&cfg), ReferenceSource::Eager);
        cfg.model.lora = Some(LoraSpec::default());
        assert_eq!(ReferenceSource::of(&cfg), ReferenceSource::OnDemand);
        cfg.preference.reference_logps = Some("ref.parquet".into());
        assert_eq!(ReferenceSource::of(&cfg), ReferenceSource::File);
    }

    #[test]
    fn checkpoint_bits_round_trip_exactly_and_sorted() {
        let cfg = RunConfig::default();
        let values = [(7, (-0.0, f64::MIN_POSITIVE / 4.0)), (2, (-1.5e-300, f64::NAN)), (5, (-3.25, -1e6))];
        let reference = Reference { source: ReferenceSource::Eager, sums: values.into_iter().collect() };
        let bits = reference.to_bits();
        assert_eq!(bits.iter().map(|b| b.0).collect::<Vec<_>>(), [2, 5, 7]);
        assert_eq!(Reference::from_bits(&cfg, bits.clone()).to_bits(), bits);
        assert_eq!(bits[2].1, (-0.0f64).to_bits(), "the sign of zero survives");
    }

    #[test]
    fn a_reference_file_must_hold_every_pair_with_its_token_counts() -> Result<()> {
        let data = RunData::embedded(12, 2, 0)?;
        let rows: Vec<PairLogps> = pairs(&data)
            .iter()
            .map(|t| PairLogps {
                pair: t.id,
                chosen_logp: -1.0,
                rejected_logp: -2.0,
                chosen_tokens: t.chosen.len() as u32,
                rejected_tokens: t.rejected.len() as u32,
            })
            .collect();
        let dir = tempfile::tempdir().map_err(|e| TrainError::Config(e.to_string()))?;
        let path = dir.path().join("ref.parquet");
        write_logps(&path, &rows)?;
        assert_eq!(read_checked(&path, &data)?.len(), rows.len());
        write_logps(&path, &rows[1..])?;
        let missing = read_checked(&path, &data).expect_err("a pair is missing").to_string();
        assert!(missing.contains(&format!("no reference log-probs for pair {}", rows[0].pair)), "{missing}");
        let mut other = rows.clone();
        other[0].chosen_tokens += 1;
        write_logps(&path, &other)?;
        let counts = read_checked(&path, &data).expect_err("other token counts").to_string();
        assert!(counts.contains("chosen/rejected tokens there"), "{counts}");
        Ok(())
    }

    #[test]
    fn on_demand_sums_are_the_base_model_s_and_computed_once() -> Result<()> {
        let data = RunData::embedded(12, 2, 0)?;
        let device = Device::Cpu;
        let base = CausalLm::random(&tiny_llama(16, 1), 3, &device)?;
        let expected = score_pairs(&base, &pairs(&data), 4, false)?.0;
        let lm =
            CausalLm::random(&tiny_llama(16, 1), 3, &device)?.with_lora(LoraConfig::new(2, 4.0, &["q_proj"]), 1)?;
        for (_, var) in lm.trainable_vars() {
            var.set(&var.as_tensor().ones_like()?.affine(0.1, 0.0)?)?;
        }
        let mut cfg = RunConfig::default();
        cfg.model.lora = Some(LoraSpec::default());
        let mut reference = Reference::at_start(&lm, &data, &cfg)?;
        assert!(reference.to_bits().is_empty(), "nothing before a pair is needed");
        let all = pairs(&data);
        reference.ensure(&lm, &all[..3], 2)?;
        reference.ensure(&lm, &[all[0], all[0], all[1]], 2)?;
        assert_eq!(reference.to_bits().len(), 3);
        reference.ensure(&lm, &all, 4)?;
        let got: Vec<(u64, f64, f64)> =
            all.iter().map(|t| reference.get(t.id).map(|(c, r)| (t.id, c, r))).collect::<Option<_>>().expect("all");
        assert!(close(&got, &expected), "adapters off: the base model's sums");
        let policy = score_pairs(&lm, &all, 4, false)?.0;
        assert!(!close(&got, &policy), "the adapters are on again afterwards");
        Ok(())
    }
}
