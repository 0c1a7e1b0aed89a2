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
/// hold 0 (the separate-rows fallback: some finite value). Models that do not run the fused
/// attention block (other devices and dtypes, Gemma with the erf `gelu`), batches that are not
/// right-padded and pairs that share nothing take [`Model::token_logps`] directly.
pub fn pair_token_logps(
    model: &Model,
    input_ids: &Tensor,
    attention_mask: Option<&Tensor>,
    chunk: usize,
) -> Result<Tensor> {
    pair_logps(model, input_ids, attention_mask, None, chunk)
}

/// [`pair_token_logps`] at the positions `wanted` `[2 n, seq]` marks (non-zero; e.g. the
/// completion mask of a preference batch), 0 everywhere else: the log-probs nobody reads are not
/// computed, and the last layer's MLP block skips the packed positions none of the wanted ones
/// is predicted from (a pair's prompt, but for its last token). Values and gradients at the
/// wanted positions equal [`pair_token_logps`]'s within float rounding.
pub fn pair_token_logps_at(
    model: &Model,
    input_ids: &Tensor,
    attention_mask: Option<&Tensor>,
    wanted: &Tensor,
    chunk: usize,
) -> Result<Tensor> {
    pair_logps(model, input_ids, attention_mask, Some(wanted), chunk)
}

fn pair_logps(
    model: &Model,
    input_ids: &Tensor,
    attention_mask: Option<&Tensor>,
    wanted: Option<&Tensor>,
    chunk: usize,
) -> Result<Tensor> {
    let (rows, seq) = input_ids.dims2()?;
    if rows % 2 != 0 {
        return Err(ModelError::Input {
            input: "input_ids",
            reason: format!("{rows} rows; pairs need chosen rows then rejected rows, an even number"),
        });
    }
    if let Some(w) = wanted
        && w.dims() != [rows, seq]
    {
        return Err(ModelError::Input {
            input: "wanted",
            reason: format!("shape {:?} does not match input_ids [{rows}, {seq}]", w.dims()),
        });
    }
    let separate_rows = || -> Result<Tensor> {
        let all = model.token_logps(input_ids, attention_mask, chunk)?;
        Ok(match wanted {
            Some(w) => (all * w.ne(0u32)?.to_dtype(DType::F32)?)?,
            None => all,
        })
    };
    let ids: Vec<u32> = input_ids.to_dtype(DType::U32)?.flatten_all()?.to_vec1()?;
    let Some(lengths) = right_padded_lengths(attention_mask, rows, seq)? else {
        return separate_rows();
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
        return separate_rows();
    }
    let width = layouts.iter().map(PairLayout::packed_len).max().unwrap_or(0).max(1);
    let (mut packed, mut mask) = (vec![0u32; n * width], vec![0u8; n * width]);
    for (i, l) in layouts.iter().enumerate() {
        let row = &mut packed[i * width..(i + 1) * width];
        row[..l.chosen].copy_from_slice(&ids[i * seq..i * seq + l.chosen]);
        row[l.chosen..l.packed_len()].copy_from_slice(&ids[(n + i) * seq + l.prefix..(n + i) * seq + l.rejected]);
        mask[i * width..i * width + l.packed_len()].fill(1);
    }
    let wanted: Option<Vec<u8>> = match wanted {
        Some(w) => Some(w.ne(0u32)?.flatten_all()?.to_vec1()?),
        None => None,
    };
    let needed = Needed::of(&layouts, &ids, wanted.as_deref(), n, seq, width);
    let device = input_ids.device();
    let packed = Tensor::from_vec(packed, (n, width), device)?;
    let mask = Tensor::from_vec(mask, (n, width), device)?;
    let branches: Vec<(usize, usize)> = layouts.iter().map(|l| (l.prefix, l.chosen - l.prefix)).collect();
    let kept = needed.rows.len();
    let keep = Tensor::from_vec(needed.rows, kept, device)?;
    let hidden = model.forward_hidden_branched(&packed, &mask, &branches, Some(&keep))?;
    let Some(hidden) = hidden else {
        return separate_rows();
    };
    let entries = needed.labels.len();
    if entries == 0 {
        return Ok(Tensor::zeros((rows, seq), DType::F32, device)?);
    }
    let picked = hidden.index_select(&Tensor::from_vec(needed.entry_rows, entries, device)?, 0)?;
    let labels = Tensor::from_vec(needed.labels, entries, device)?;
    let (lm_head, cap) = (model.lm_head(), model.final_logit_softcapping());
    let values = crate::logps::lm_head_logps(&picked, lm_head, &labels, cap, rows.saturating_mul(chunk))?;
    // Positions without an entry read the appended 0.
    let values = Tensor::cat(&[&values, &Tensor::zeros(1, DType::F32, device)?], 0)?;
    let out_index = Tensor::from_vec(needed.out_index, rows * seq, device)?;
    Ok(values.index_select(&out_index, 0)?.reshape((rows, seq))?)
}

/// The log-probs a packed batch needs, each computed once, and the packed positions they are
/// predicted from. Entry `e` is `log p(labels[e] | hidden state of the kept row
/// entry_rows[e])`; kept row `k` is packed position `rows[k]` (`pair * width + slot`,
/// ascending); output position `(r, t)` reads entry `out_index[r * seq + t]`, or the entry
/// count (one past the last: 0) where nothing is wanted (position 0, padding, unwanted). A
/// rejected row's labels inside the shared prefix are the chosen row's (same slot, same token),
/// so a pair sharing `P` tokens needs up to `P - 1` entries fewer than its two rows.
struct Needed {
    rows: Vec<u32>,
    entry_rows: Vec<u32>,
    labels: Vec<u32>,
    out_index: Vec<u32>,
}

impl Needed {
    fn of(layouts: &[PairLayout], ids: &[u32], wanted: Option<&[u8]>, n: usize, seq: usize, width: usize) -> Self {
        const NONE: u32 = u32::MAX;
        let is_wanted = |r: usize, t: usize| wanted.is_none_or(|w| w[r * seq + t] != 0);
        let (mut slots, mut labels) = (Vec::new(), Vec::new());
        let mut out_index = vec![NONE; 2 * n * seq];
        let mut push = |slot: usize, label: u32| {
            slots.push(slot);
            labels.push(label);
            (labels.len() - 1) as u32
        };
        for (i, l) in layouts.iter().enumerate() {
            let (chosen, rejected) = (&ids[i * seq..], &ids[(n + i) * seq..]);
            for t in (1..l.chosen).filter(|&t| is_wanted(i, t)) {
                out_index[i * seq + t] = push(i * width + t - 1, chosen[t]);
            }
            for t in (1..l.rejected).filter(|&t| is_wanted(n + i, t)) {
                let shared = if t < l.prefix { out_index[i * seq + t] } else { NONE };
                out_index[(n + i) * seq + t] =
                    if shared != NONE { shared } else { push(i * width + l.rejected_slot(t - 1), rejected[t]) };
            }
        }
        let entries = labels.len() as u32;
        out_index.iter_mut().filter(|e| **e == NONE).for_each(|e| *e = entries);
        // Kept rows: the distinct slots, ascending; each entry's row among them.
        let mut kept = vec![NONE; n * width];
        slots.iter().for_each(|&s| kept[s] = 0);
        let mut rows = Vec::new();
        for (slot, k) in kept.iter_mut().enumerate().filter(|(_, k)| **k != NONE) {
            *k = rows.len() as u32;
            rows.push(slot as u32);
        }
        let entry_rows = slots.iter().map(|&s| kept[s]).collect();
        Self { rows, entry_rows, labels, out_index }
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
