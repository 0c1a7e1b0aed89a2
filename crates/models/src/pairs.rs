//! Preference pairs in one forward pass, each pair's shared prefix computed once.
//!
//! A [`PairBatch`] holds `n` pairs as `(prompt, chosen, rejected)` token sequences and packs each
//! into one row `[prefix | chosen rest | rejected rest | padding]`, where the prefix is the
//! prompt and the completions' common start (position `t` of a causal model depends only on
//! tokens `0..=t`, so over the prefix the two sequences have the same hidden states). The
//! rejected rest attends to the prefix and to itself (not to the chosen rest) with rotary
//! positions continuing from the prefix ([`crate::fused::AttentionSpec::with_branches`]); the
//! model runs over `n` rows and computes each completion token's log-prob once from its packed
//! slot ([`Model::completion_logps`]), returned per side as [`CompletionLogps`]. The log-probs
//! equal [`Model::token_logps`] of the sequences run separately, values and gradients, within
//! float rounding (`tests/pairs.rs`), and the model processes `P` fewer positions for each pair
//! sharing `P` tokens (a quarter of the positions for prompts as long as each response).
//!
//! [`pair_token_logps`] and [`pair_token_logps_at`] do the same for a batch that arrives as
//! `2 n` right-padded rows (chosen rows, then rejected rows; row `i` and row `n + i` are a pair),
//! finding each pair's prefix as the rows' longest common prefix.

use candle_core::{DType, Device, Tensor};

use crate::causal_lm::Model;
use crate::{ModelError, Result};

/// One pair's shared prefix and full sequence lengths (prompt included), in tokens.
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

    /// Position in the packed row of token `t` of the rejected sequence (`t < rejected`).
    fn rejected_slot(&self, t: usize) -> usize {
        if t < self.prefix { t } else { self.chosen + (t - self.prefix) }
    }
}

/// Pairs packed one row each: row `i` of `ids` (`[n, width]`, zero-padded) is
/// `[prefix | chosen rest | rejected rest]` of `layouts[i]`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Packed {
    layouts: Vec<PairLayout>,
    ids: Vec<u32>,
    width: usize,
}

impl Packed {
    /// Packs pair `i` as the concatenation of `parts(i)`, which must hold `layouts[i].packed_len()`
    /// tokens.
    fn new<'a>(layouts: Vec<PairLayout>, parts: impl Fn(usize) -> [&'a [u32]; 3]) -> Self {
        let width = layouts.iter().map(PairLayout::packed_len).max().unwrap_or(0).max(1);
        let mut ids = vec![0u32; layouts.len() * width];
        for (i, row) in ids.chunks_exact_mut(width).enumerate() {
            let mut at = 0;
            for part in parts(i) {
                row[at..at + part.len()].copy_from_slice(part);
                at += part.len();
            }
        }
        Self { layouts, ids, width }
    }

    fn pairs(&self) -> usize {
        self.layouts.len()
    }

    /// Token `t` of pair `i`'s chosen sequence.
    fn chosen_token(&self, i: usize, t: usize) -> u32 {
        self.ids[i * self.width + t]
    }

    /// Token `t` of pair `i`'s rejected sequence.
    fn rejected_token(&self, i: usize, t: usize) -> u32 {
        self.ids[i * self.width + self.layouts[i].rejected_slot(t)]
    }
}

/// `n` preference pairs, each `(prompt, chosen, rejected)` tokens, packed for
/// [`Model::completion_logps`] (see the module docs). Built on the host from the token
/// sequences; nothing about the layout is recomputed on the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairBatch {
    packed: Packed,
    prompt_lens: Vec<usize>,
    chosen_lens: Vec<usize>,
    rejected_lens: Vec<usize>,
}

impl PairBatch {
    /// Packs `(prompt, chosen, rejected)` token sequences. The prompt must hold at least one
    /// token (the first completion token is predicted from the last prompt token) and each
    /// completion at least one. A pair's shared prefix is its prompt plus its completions'
    /// common start (computed once, as the prompt is).
    pub fn new<'a>(pairs: impl IntoIterator<Item = (&'a [u32], &'a [u32], &'a [u32])>) -> Result<Self> {
        let pairs: Vec<_> = pairs.into_iter().collect();
        for (i, (prompt, chosen, rejected)) in pairs.iter().enumerate() {
            let empty = [("prompt", prompt), ("chosen completion", chosen), ("rejected completion", rejected)]
                .into_iter()
                .find(|(_, part)| part.is_empty());
            if let Some((what, _)) = empty {
                return Err(ModelError::Input {
                    input: "pairs",
                    reason: format!("pair {i} has an empty {what}; each part needs at least one token"),
                });
            }
        }
        let shared: Vec<usize> =
            pairs.iter().map(|(_, c, r)| c.iter().zip(*r).take_while(|(a, b)| a == b).count()).collect();
        let layouts = pairs
            .iter()
            .zip(&shared)
            .map(|((p, c, r), &s)| PairLayout {
                prefix: p.len() + s,
                chosen: p.len() + c.len(),
                rejected: p.len() + r.len(),
            })
            .collect();
        let packed = Packed::new(layouts, |i| {
            let (p, c, r) = pairs[i];
            [p, c, &r[shared[i]..]]
        });
        Ok(Self {
            packed,
            prompt_lens: pairs.iter().map(|(p, ..)| p.len()).collect(),
            chosen_lens: pairs.iter().map(|(_, c, _)| c.len()).collect(),
            rejected_lens: pairs.iter().map(|(.., r)| r.len()).collect(),
        })
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.packed.pairs()
    }

    /// Whether the batch holds no pair.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Prompt tokens of each pair.
    pub fn prompt_lens(&self) -> &[usize] {
        &self.prompt_lens
    }

    /// Chosen completion tokens of each pair.
    pub fn chosen_lens(&self) -> &[usize] {
        &self.chosen_lens
    }

    /// Rejected completion tokens of each pair.
    pub fn rejected_lens(&self) -> &[usize] {
        &self.rejected_lens
    }

    /// Positions of the packed rows, padding included: `pairs x width`.
    pub fn packed_positions(&self) -> usize {
        self.len() * self.packed.width
    }

    /// Real positions of the packed rows: per pair, its sequences' tokens less the shared prefix
    /// counted once.
    pub fn packed_tokens(&self) -> usize {
        self.packed.layouts.iter().map(PairLayout::packed_len).sum()
    }

    /// The pairs as `2 n` right-padded rows `[2 n, seq]` (chosen rows, then rejected rows) and
    /// their attention mask, the input of [`Model::token_logps`].
    fn rows(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        let p = &self.packed;
        let n = p.pairs();
        let seq = p.layouts.iter().map(|l| l.chosen.max(l.rejected)).max().unwrap_or(0);
        let (mut ids, mut mask) = (vec![0u32; 2 * n * seq], vec![0u8; 2 * n * seq]);
        for (i, l) in p.layouts.iter().enumerate() {
            for t in 0..l.chosen {
                ids[i * seq + t] = p.chosen_token(i, t);
            }
            for t in 0..l.rejected {
                ids[(n + i) * seq + t] = p.rejected_token(i, t);
            }
            mask[i * seq..i * seq + l.chosen].fill(1);
            mask[(n + i) * seq..(n + i) * seq + l.rejected].fill(1);
        }
        Ok((Tensor::from_vec(ids, (2 * n, seq), device)?, Tensor::from_vec(mask, (2 * n, seq), device)?))
    }
}

/// Completion-token log-probs of a [`PairBatch`], per side:
/// `chosen[i, j] = log p(chosen_i[j] | prompt_i, chosen_i[..j])` for `j < chosen_lens[i]`, 0
/// after (`chosen_mask` 0); the same for the rejected completions.
#[derive(Debug, Clone)]
pub struct CompletionLogps {
    /// `[n, max chosen length]` f32.
    pub chosen: Tensor,
    /// `[n, max chosen length]` u8, 1 on the chosen completion's tokens.
    pub chosen_mask: Tensor,
    /// `[n, max rejected length]` f32.
    pub rejected: Tensor,
    /// `[n, max rejected length]` u8, 1 on the rejected completion's tokens.
    pub rejected_mask: Tensor,
}

/// One side of a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Chosen,
    Rejected,
}

/// The `[n, width]` index of one side's completion tokens (entry `(i, j)` is `at(i, j)` for
/// `j < lens[i]`, `none` after), its mask and `width`, the longest completion.
fn completion_index(lens: &[usize], none: u32, at: impl Fn(usize, usize) -> u32) -> (Vec<u32>, Vec<u8>, usize) {
    let width = lens.iter().copied().max().unwrap_or(0);
    let (mut index, mut mask) = (vec![none; lens.len() * width], vec![0u8; lens.len() * width]);
    for (i, &len) in lens.iter().enumerate() {
        for j in 0..len {
            index[i * width + j] = at(i, j);
            mask[i * width + j] = 1;
        }
    }
    (index, mask, width)
}

impl Model {
    /// The completion-token log-probs of `batch`'s pairs ([`CompletionLogps`]), differentiable
    /// w.r.t. every weight, with at most `2 n x chunk` positions' logits at a time. Models that
    /// run the fused attention block compute the packed rows (see the module docs); others
    /// (other devices and dtypes, Gemma with the erf `gelu`) run [`Model::token_logps`] on the
    /// `2 n` sequences.
    pub fn completion_logps(&self, batch: &PairBatch, chunk: usize) -> Result<CompletionLogps> {
        let p = &batch.packed;
        let n = p.pairs();
        let (prompts, chosen_lens, rejected_lens) = (&batch.prompt_lens, &batch.chosen_lens, &batch.rejected_lens);
        // Output positions: the chosen side's `[n, c]`, then the rejected side's `[n, r]`.
        let c = chosen_lens.iter().copied().max().unwrap_or(0);
        let r = rejected_lens.iter().copied().max().unwrap_or(0);
        let out = |side: Side, i: usize, t: usize| -> Option<usize> {
            let j = t.checked_sub(prompts[i])?;
            Some(match side {
                Side::Chosen => i * c + j,
                Side::Rejected => n * c + i * r + j,
            })
        };
        let needed = Needed::of(p, n * (c + r), out);
        let device = self.lm_head().device().clone();
        let Some(values) = entry_logps(self, p, &needed, (2 * n).saturating_mul(chunk), &device)? else {
            // Separate rows: completion token `j` of pair `i` is position `prompt + j` of its row.
            let (ids, mask) = batch.rows(&device)?;
            let seq = ids.dim(1)?;
            let all = self.token_logps(&ids, Some(&mask), chunk)?.flatten_all()?;
            let all = Tensor::cat(&[&all, &Tensor::zeros(1, DType::F32, &device)?], 0)?;
            let none = (2 * n * seq) as u32;
            let chosen = completion_index(chosen_lens, none, |i, j| (i * seq + prompts[i] + j) as u32);
            let rejected = completion_index(rejected_lens, none, |i, j| ((n + i) * seq + prompts[i] + j) as u32);
            return side_logps(&all, chosen, rejected, n, &device);
        };
        let none = needed.labels.len() as u32;
        let chosen = completion_index(chosen_lens, none, |i, j| needed.out_index[i * c + j]);
        let rejected = completion_index(rejected_lens, none, |i, j| needed.out_index[n * c + i * r + j]);
        side_logps(&values, chosen, rejected, n, &device)
    }
}

/// Both sides' `[n, width]` log-probs gathered from `values` by their indices, with their masks.
fn side_logps(
    values: &Tensor,
    chosen: (Vec<u32>, Vec<u8>, usize),
    rejected: (Vec<u32>, Vec<u8>, usize),
    n: usize,
    device: &Device,
) -> Result<CompletionLogps> {
    let gather = |(index, mask, width): (Vec<u32>, Vec<u8>, usize)| -> Result<(Tensor, Tensor)> {
        let index = Tensor::from_vec(index, n * width, device)?;
        Ok((values.index_select(&index, 0)?.reshape((n, width))?, Tensor::from_vec(mask, (n, width), device)?))
    };
    let (chosen, chosen_mask) = gather(chosen)?;
    let (rejected, rejected_mask) = gather(rejected)?;
    Ok(CompletionLogps { chosen, chosen_mask, rejected, rejected_mask })
}

/// Per-token log-probs `[2 n, seq]` (f32) of the `n` pairs in `input_ids` `[2 n, seq]` (chosen
/// rows, then rejected rows; `attention_mask` marks right padding): `out[r, t] = log p(ids[r, t]
/// | ids[r, <t])` on real tokens, as [`Model::token_logps`]; position 0 and padding positions
/// hold 0 (the separate-rows fallback: some finite value). Each pair's prefix is its rows'
/// longest common prefix. Models that do not run the fused attention block (other devices and
/// dtypes, Gemma with the erf `gelu`), batches that are not right-padded and pairs that share
/// nothing take [`Model::token_logps`] directly.
pub fn pair_token_logps(
    model: &Model,
    input_ids: &Tensor,
    attention_mask: Option<&Tensor>,
    chunk: usize,
) -> Result<Tensor> {
    rows_logps(model, input_ids, attention_mask, None, chunk)
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
    rows_logps(model, input_ids, attention_mask, Some(wanted), chunk)
}

fn rows_logps(
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
    let chosen_row = |i: usize| &ids[i * seq..i * seq + lengths[i]];
    let rejected_row = |i: usize| &ids[(n + i) * seq..(n + i) * seq + lengths[n + i]];
    let layouts: Vec<PairLayout> = (0..n)
        .map(|i| {
            let (c, r) = (chosen_row(i), rejected_row(i));
            PairLayout {
                prefix: c.iter().zip(r).take_while(|(a, b)| a == b).count(),
                chosen: c.len(),
                rejected: r.len(),
            }
        })
        .collect();
    if layouts.iter().all(|l| l.prefix == 0) {
        return separate_rows();
    }
    let prefixes: Vec<usize> = layouts.iter().map(|l| l.prefix).collect();
    let packed = Packed::new(layouts, |i| [chosen_row(i), &rejected_row(i)[prefixes[i]..], &[]]);
    let wanted: Option<Vec<u8>> = match wanted {
        Some(w) => Some(w.ne(0u32)?.flatten_all()?.to_vec1()?),
        None => None,
    };
    let out = |side: Side, i: usize, t: usize| -> Option<usize> {
        let r = match side {
            Side::Chosen => i,
            Side::Rejected => n + i,
        };
        wanted.as_ref().is_none_or(|w| w[r * seq + t] != 0).then_some(r * seq + t)
    };
    let needed = Needed::of(&packed, rows * seq, out);
    match entry_logps(model, &packed, &needed, rows.saturating_mul(chunk), input_ids.device())? {
        Some(values) => {
            let out_index = Tensor::from_vec(needed.out_index, rows * seq, input_ids.device())?;
            Ok(values.index_select(&out_index, 0)?.reshape((rows, seq))?)
        }
        None => separate_rows(),
    }
}

/// The log-probs of `needed`'s entries followed by one 0 (`[entries + 1]`, what an output
/// position without an entry reads), computed from the packed rows with the logits of at most
/// `max_rows` rows at a time; `None` when the model does not run the branched forward pass.
fn entry_logps(
    model: &Model,
    packed: &Packed,
    needed: &Needed,
    max_rows: usize,
    device: &Device,
) -> Result<Option<Tensor>> {
    let zero = Tensor::zeros(1, DType::F32, device)?;
    let entries = needed.labels.len();
    if entries == 0 {
        return Ok(Some(zero));
    }
    let n = packed.pairs();
    let width = packed.width;
    let mask: Vec<u8> =
        packed.layouts.iter().flat_map(|l| (0..width).map(move |t| u8::from(t < l.packed_len()))).collect();
    let ids = Tensor::from_slice(&packed.ids, (n, width), device)?;
    let mask = Tensor::from_vec(mask, (n, width), device)?;
    let branches: Vec<(usize, usize)> = packed.layouts.iter().map(|l| (l.prefix, l.chosen - l.prefix)).collect();
    let keep = Tensor::from_slice(&needed.rows, needed.rows.len(), device)?;
    let hidden = model.forward_hidden_branched(&ids, &mask, &branches, Some(&keep))?;
    let Some(hidden) = hidden else {
        return Ok(None);
    };
    let picked = hidden.index_select(&Tensor::from_slice(&needed.entry_rows, entries, device)?, 0)?;
    let labels = Tensor::from_slice(&needed.labels, entries, device)?;
    let (lm_head, cap) = (model.lm_head(), model.final_logit_softcapping());
    let values = crate::logps::lm_head_logps(&picked, lm_head, &labels, cap, max_rows)?;
    Ok(Some(Tensor::cat(&[&values, &zero], 0)?))
}

/// The log-probs a packed batch needs, each computed once, and the packed positions they are
/// predicted from. Entry `e` is `log p(labels[e] | hidden state of the kept row
/// entry_rows[e])`; kept row `k` is packed position `rows[k]` (`pair * width + slot`,
/// ascending); output position `o` reads entry `out_index[o]`, or the entry count (one past the
/// last: 0) where nothing is wanted. A rejected sequence's labels inside the shared prefix are
/// the chosen sequence's (same slot, same token), so a pair sharing `P` tokens needs up to
/// `P - 1` entries fewer than its two sequences.
struct Needed {
    rows: Vec<u32>,
    entry_rows: Vec<u32>,
    labels: Vec<u32>,
    out_index: Vec<u32>,
}

impl Needed {
    /// The entries for the outputs `out(side, pair, t)` names (an output position below
    /// `outputs`, or `None` where token `t >= 1` of that sequence is not wanted), pair by pair,
    /// chosen tokens then rejected tokens, in token order.
    fn of(packed: &Packed, outputs: usize, out: impl Fn(Side, usize, usize) -> Option<usize>) -> Self {
        const NONE: u32 = u32::MAX;
        let width = packed.width;
        let (mut slots, mut labels) = (Vec::new(), Vec::new());
        let mut out_index = vec![NONE; outputs];
        let mut push = |slot: usize, label: u32| {
            slots.push(slot);
            labels.push(label);
            (labels.len() - 1) as u32
        };
        for (i, l) in packed.layouts.iter().enumerate() {
            // The chosen entry of each prefix position, shared with the rejected sequence.
            let mut prefix_entry = vec![NONE; l.prefix];
            for t in 1..l.chosen {
                if let Some(o) = out(Side::Chosen, i, t) {
                    let e = push(i * width + t - 1, packed.chosen_token(i, t));
                    out_index[o] = e;
                    if let Some(shared) = prefix_entry.get_mut(t) {
                        *shared = e;
                    }
                }
            }
            for t in 1..l.rejected {
                if let Some(o) = out(Side::Rejected, i, t) {
                    let shared = prefix_entry.get(t).copied().unwrap_or(NONE);
                    out_index[o] = if shared != NONE {
                        shared
                    } else {
                        push(i * width + l.rejected_slot(t - 1), packed.rejected_token(i, t))
                    };
                }
            }
        }
        let entries = labels.len() as u32;
        out_index.iter_mut().filter(|e| **e == NONE).for_each(|e| *e = entries);
        // Kept rows: the distinct slots, ascending; each entry's row among them.
        let mut kept = vec![NONE; packed.pairs() * width];
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
    fn a_pair_batch_packs_prompt_shared_start_and_both_rests() -> Result<()> {
        // Pair 0: completions share their first token (9), so the prefix is 2 + 1.
        let pairs: [(&[u32], &[u32], &[u32]); 2] = [(&[1, 2], &[9, 3], &[9, 4, 5]), (&[7], &[8], &[6, 6])];
        let batch = PairBatch::new(pairs)?;
        let p = &batch.packed;
        assert_eq!(
            p.layouts,
            [PairLayout { prefix: 3, chosen: 4, rejected: 5 }, PairLayout { prefix: 1, chosen: 2, rejected: 3 }]
        );
        assert_eq!((p.width, p.ids.clone()), (6, vec![1, 2, 9, 3, 4, 5, 7, 8, 6, 6, 0, 0]));
        assert_eq!((0..5).map(|t| p.rejected_token(0, t)).collect::<Vec<_>>(), [1, 2, 9, 4, 5]);
        assert_eq!((batch.packed_positions(), batch.packed_tokens()), (12, 10));
        assert_eq!(
            (batch.prompt_lens(), batch.chosen_lens(), batch.rejected_lens()),
            (&[2, 1][..], &[2, 1][..], &[3, 2][..])
        );
        let (ids, mask) = batch.rows(&Device::Cpu)?;
        assert_eq!(ids.to_vec2::<u32>()?, [[1, 2, 9, 3, 0], [7, 8, 0, 0, 0], [1, 2, 9, 4, 5], [7, 6, 6, 0, 0]]);
        assert_eq!(mask.sum_all()?.to_dtype(DType::U32)?.to_scalar::<u32>()?, 4 + 2 + 5 + 3);
        Ok(())
    }

    #[test]
    fn every_part_of_a_pair_needs_a_token() {
        let empty: [&[u32]; 3] = [&[], &[], &[]];
        for k in 0..3 {
            let mut parts: [&[u32]; 3] = [&[1], &[2], &[3]];
            parts[k] = empty[k];
            let err = PairBatch::new([(&[5u32][..], &[6u32][..], &[7u32][..]), (parts[0], parts[1], parts[2])])
                .expect_err("an empty part");
            let what = ["prompt", "chosen completion", "rejected completion"][k];
            assert!(err.to_string().contains(&format!("pair 1 has an empty {what}")), "{err}");
        }
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
