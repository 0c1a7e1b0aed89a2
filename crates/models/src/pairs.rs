//! Preference pairs in one forward pass, each pair's common prefix computed once.
//!
//! A batch of `n` pairs arrives as `2 n` right-padded rows: chosen rows, then rejected rows (row
//! `i` and row `n + i` are a pair). Both rows of a pair start with the same prompt tokens, and
//! position `t` of a causal model depends only on tokens `0..=t`, so over the rows' longest
//! common prefix the two rows have the same hidden states. [`pair_token_logps`] packs each pair
//! into one row `[prefix | chosen rest | rejected rest | padding]`, where the rejected rest
//! attends to the prefix and to itself (not to the chosen rest) with rotary positions continuing
//! from the prefix ([`crate::fused::AttentionSpec::with_branches`]), runs the model over `n`
//! rows, and computes each needed log-prob once from its packed slot (the prefix's log-probs,
//! the same in both rows of a pair, once). The
//! log-probs equal [`Model::token_logps`] on every real token, values and gradients, within
//! float rounding (`tests/pairs.rs`), and the model processes `P` fewer positions for each pair
//! sharing `P` tokens (a quarter of the positions for prompts as long as each response).

use candle_core::{DType, Tensor};

use crate::causal_lm::Model;
use crate::{ModelError, Result};

/// One pair's real lengths and shared prefix, in tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PairLayout {
    prefix: usize,
    chosen: usize,
    rejected: usize,
}

impl PairLayout {
    /// Length of the packed row `[prefix | chosen rest | rejected rest]`.
    fn packed_len(&self) -> usize {
        self.chosen + self.rejected - self.prefix
    }

    /// Position in the packed row of token `t` of the rejected row (`t < rejected`).
    fn rejected_slot(&self, t: usize) -> usize {
        if t < self.prefix { t } else { self.chosen + (t - self.prefix) }
    }
}

/// Per-token log-probs `[2 n, seq]` (f32) of the `n` pairs in `input_ids` `[2 n, seq]` (chosen
/// rows, then rejected rows; `attention_mask` marks right padding): `out[r, t] = log p(ids[r, t]
/// | ids[r, <t])` on real tokens, as [`Model::token_logps`]; position 0 and padding positions
/// hold 0 (the separate-rows fallback: some finite value). Models that do not run the fused attention block (other devices and dtypes, Gemma with
/// the erf `gelu`), batches that are not right-padded and pairs that share nothing take
/// [`Model::token_logps`] directly.
pub fn pair_token_logps(
    model: &Model,
    input_ids: &Tensor,
    attention_mask: Option<&Tensor>,
    chunk: usize,
) -> Result<Tensor> {
    let (rows, seq) = input_ids.dims2()?;
    if rows % 2 != 0 {
        return Err(ModelError::Input {
            input: "input_ids",
            reason: format!("{rows} rows; pairs need chosen rows then rejected rows, an even number"),
        });
    }
    let ids: Vec<u32> = input_ids.to_dtype(DType::U32)?.flatten_all()?.to_vec1()?;
    let Some(lengths) = right_padded_lengths(attention_mask, rows, seq)? else {
        return model.token_logps(input_ids, attention_mask, chunk);
    };
    let n = rows / 2;
    let layouts: Vec<PairLayout> = (0..n)
        .map(|i| {
            let (chosen, rejected) = (lengths[i], lengths[n + i]);
            let c = &ids[i * seq..i * seq + chosen];
            let r = &ids[(n + i) * seq..(n + i) * seq + rejected];
            PairLayout { prefix: c.iter().zip(r).take_while(|(a, b)| a == b).count(), chosen, rejected }
        })
        .collect();
    if layouts.iter().all(|l| l.prefix == 0) {
        return model.token_logps(input_ids, attention_mask, chunk);
    }
    let width = layouts.iter().map(PairLayout::packed_len).max().unwrap_or(0).max(1);
    let (mut packed, mut mask) = (vec![0u32; n * width], vec![0u8; n * width]);
    for (i, l) in layouts.iter().enumerate() {
        let row = &mut packed[i * width..(i + 1) * width];
        row[..l.chosen].copy_from_slice(&ids[i * seq..i * seq + l.chosen]);
        row[l.chosen..l.packed_len()].copy_from_slice(&ids[(n + i) * seq + l.prefix..(n + i) * seq + l.rejected]);
        mask[i * width..i * width + l.packed_len()].fill(1);
    }
    let device = input_ids.device();
    let packed = Tensor::from_vec(packed, (n, width), device)?;
    let mask = Tensor::from_vec(mask, (n, width), device)?;
    let branches: Vec<(usize, usize)> = layouts.iter().map(|l| (l.prefix, l.chosen - l.prefix)).collect();
    let hidden = match model {
        Model::Llama(m) => m.forward_hidden_branched(&packed, &mask, &branches)?,
        Model::Gemma(m) => m.forward_hidden_branched(&packed, &mask, &branches)?,
    };
    let Some(hidden) = hidden else {
        return model.token_logps(input_ids, attention_mask, chunk);
    };
    let wanted = Wanted::of(&layouts, &ids, n, seq, width);
    let h = hidden.dim(2)?;
    let gather = Tensor::from_vec(wanted.slots, wanted.labels.len(), device)?;
    let picked = hidden.reshape((n * width, h))?.index_select(&gather, 0)?;
    let labels = Tensor::from_vec(wanted.labels, picked.dim(0)?, device)?;
    let (lm_head, cap) = match model {
        Model::Llama(m) => (m.lm_head(), None),
        Model::Gemma(m) => (m.lm_head(), m.config().final_logit_softcapping),
    };
    let values = crate::logps::lm_head_logps(&picked, lm_head, &labels, cap, rows.saturating_mul(chunk))?;
    // Position 0 and padding read the appended 0.
    let values = Tensor::cat(&[&values, &Tensor::zeros(1, DType::F32, device)?], 0)?;
    let out_index = Tensor::from_vec(wanted.out_index, rows * seq, device)?;
    Ok(values.index_select(&out_index, 0)?.reshape((rows, seq))?)
}

/// The log-probs a packed batch needs, each computed once: entry `e` is
/// `log p(labels[e] | hidden at packed slot slots[e])`, and output position `(r, t)` reads entry
/// `out_index[r * seq + t]` (the entry count, one past the last, for position 0 and padding).
/// A rejected row's labels inside the shared prefix are the chosen row's (same slot, same
/// token), so a pair sharing `P` tokens needs `P - 1` entries fewer than its two rows.
struct Wanted {
    slots: Vec<u32>,
    labels: Vec<u32>,
    out_index: Vec<u32>,
}

impl Wanted {
    fn of(layouts: &[PairLayout], ids: &[u32], n: usize, seq: usize, width: usize) -> Self {
        let rejected_entries =
            |l: &PairLayout| if l.prefix > 0 { l.rejected - l.prefix } else { l.rejected.saturating_sub(1) };
        let entries: usize = layouts.iter().map(|l| l.chosen.saturating_sub(1) + rejected_entries(l)).sum();
        let none = entries as u32;
        let (mut slots, mut labels) = (Vec::with_capacity(entries), Vec::with_capacity(entries));
        let mut out_index = vec![none; 2 * n * seq];
        let mut push = |slot: usize, label: u32| {
            slots.push(slot as u32);
            labels.push(label);
            (labels.len() - 1) as u32
        };
        for (i, l) in layouts.iter().enumerate() {
            let (chosen, rejected) = (&ids[i * seq..], &ids[(n + i) * seq..]);
            for t in 1..l.chosen {
                out_index[i * seq + t] = push(i * width + t - 1, chosen[t]);
            }
            for t in 1..l.rejected {
                out_index[(n + i) * seq + t] = if t < l.prefix {
                    out_index[i * seq + t]
                } else {
                    push(i * width + l.rejected_slot(t - 1), rejected[t])
                };
            }
        }
        debug_assert_eq!(labels.len(), entries);
        Self { slots, labels, out_index }
    }
}

/// Real lengths of `rows` rows of `seq` tokens under `mask` (all `seq` without one), or `None`
/// when some row is not right-padded (a real token after padding).
fn right_padded_lengths(mask: Option<&Tensor>, rows: usize, seq: usize) -> Result<Option<Vec<usize>>> {
    let Some(mask) = mask else { return Ok(Some(vec![seq; rows])) };
    if mask.dims() != [rows, seq] {
        return Err(ModelError::Input {
            input: "attention_mask",
            reason: format!("shape {:?} does not match input_ids [{rows}, {seq}]", mask.dims()),
        });
    }
    let m: Vec<u8> = mask.to_dtype(DType::U8)?.flatten_all()?.to_vec1()?;
    let mut lengths = Vec::with_capacity(rows);
    for row in m.chunks_exact(seq.max(1)).take(rows) {
        let len = row.iter().take_while(|&&v| v != 0).count();
        if row[len..].iter().any(|&v| v != 0) {
            return Ok(None);
        }
        lengths.push(len);
    }
    Ok(Some(lengths))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_slots_follow_the_packed_row() {
        // prompt 3 tokens, chosen rest 2, rejected rest 4: [p p p c c r r r r]
        let l = PairLayout { prefix: 3, chosen: 5, rejected: 7 };
        assert_eq!(l.packed_len(), 9);
        assert_eq!((0..7).map(|t| l.rejected_slot(t)).collect::<Vec<_>>(), vec![0, 1, 2, 5, 6, 7, 8]);
    }

    #[test]
    fn lengths_need_right_padding() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let right = Tensor::from_vec(vec![1u8, 1, 0, 1, 0, 0], (2, 3), &dev)?;
        assert_eq!(right_padded_lengths(Some(&right), 2, 3)?, Some(vec![2, 1]));
        let hole = Tensor::from_vec(vec![1u8, 0, 1, 1, 1, 1], (2, 3), &dev)?;
        assert_eq!(right_padded_lengths(Some(&hole), 2, 3)?, None);
        assert_eq!(right_padded_lengths(None, 2, 3)?, Some(vec![3, 3]));
        Ok(())
    }
}
