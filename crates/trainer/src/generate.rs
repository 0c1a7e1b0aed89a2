//! Generating completions for prompts from a file (the `slime-trainer generate` command).
//!
//! Prompts come from a text file (one prompt per non-empty line, each a user turn) or a JSONL
//! file (`.jsonl` / `.json`: one object per line with `prompt`, a string or a message list, or
//! `messages`, a message list). Each is rendered with the chat template and the generation
//! prompt, encoded as the data pipeline encodes prompts (BOS by the tokenizer's rule), and
//! decoded greedily or by seeded sampling until a stop token (the tokenizer's EOS, the
//! template's end-of-turn token, any `extra` stop token) or `max_new_tokens`, several prompts
//! at a time in one left-padded batch (the same output as one at a time).

use std::io::Write;
use std::path::Path;

use serde::Serialize;
use slime_data::{ChatTemplate, Message, TextTokenizer};

use crate::model_source::{LoadedModel, max_positions};
use crate::{Result, TrainError};

/// One prompt as read from the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Prompt {
    /// Text: one user turn (or, without a template, the text as it is).
    Text(String),
    /// A conversation to continue.
    Messages(Vec<Message>),
}

/// How to decode.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Most new tokens per prompt.
    pub max_new_tokens: usize,
    /// 0: greedy; otherwise sampling from `softmax(logits / temperature)`.
    pub temperature: f64,
    /// Sampling seed; prompt `i` (0-based) uses `seed + i`.
    pub seed: u64,
    /// Extra stop tokens (vocabulary strings such as `<|eot_id|>` or `Ġthe`).
    pub extra_stop: Vec<String>,
    /// Prompts decoded together in one left-padded batch (>= 1). Outputs do not depend on it;
    /// larger batches read the weights once for several tokens per step.
    pub batch_size: usize,
}

/// Default [`GenerateOptions::batch_size`].
pub const DEFAULT_BATCH_SIZE: usize = 8;

impl Default for GenerateOptions {
    fn default() -> Self {
        Self { max_new_tokens: 128, temperature: 0.0, seed: 0, extra_stop: Vec::new(), batch_size: DEFAULT_BATCH_SIZE }
    }
}

/// One output line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Generation {
    /// The prompt as given (a string or a message list).
    pub prompt: Prompt,
    /// The decoded new tokens, without the final stop token.
    pub completion: String,
    /// New tokens generated (the stop token included).
    pub tokens: usize,
    /// `stop` (a stop token), `length` (max_new_tokens) or `context` (the model's
    /// max_position_embeddings).
    pub finish_reason: &'static str,
}

/// Reads prompts: JSONL for `.jsonl` / `.json` files, otherwise one prompt per non-empty line.
pub fn read_prompts(path: &Path) -> Result<Vec<Prompt>> {
    let text =
        std::fs::read_to_string(path).map_err(|source| TrainError::Io { path: path.display().to_string(), source })?;
    let jsonl = path.extension().and_then(|e| e.to_str()).is_some_and(|e| matches!(e, "jsonl" | "json"));
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if !jsonl {
            out.push(Prompt::Text(line.to_string()));
            continue;
        }
        let bad = |why: String| {
            TrainError::Config(format!(
                "{}, line {}: {why}; expected a JSON object with `prompt` (a string or a list of {{role, content}}) \
                 or `messages` (a list of {{role, content}})",
                path.display(),
                n + 1
            ))
        };
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(format!("not JSON ({e})")))?;
        let field = value.get("messages").or_else(|| value.get("prompt")).ok_or_else(|| bad("no such field".into()))?;
        let prompt = match field {
            serde_json::Value::String(s) if !s.trim().is_empty() => Prompt::Text(s.clone()),
            serde_json::Value::Array(_) => {
                let messages: Vec<Message> =
                    serde_json::from_value(field.clone()).map_err(|e| bad(format!("bad message list ({e})")))?;
                if messages.is_empty() {
                    return Err(bad("empty message list".into()));
                }
                Prompt::Messages(messages)
            }
            _ => return Err(bad("empty or not a string or list".into())),
        };
        out.push(prompt);
    }
    if out.is_empty() {
        return Err(TrainError::Config(format!("{}: no prompts in the file", path.display())));
    }
    Ok(out)
}

/// The token that ends an assistant turn in `template` (e.g. `<|eot_id|>`, `<end_of_turn>`,
/// `<|im_end|>`): the first special token the template writes after an assistant message.
pub fn end_of_turn_token(tokenizer: &TextTokenizer, template: &ChatTemplate) -> Result<Option<u32>> {
    const SENTINEL: &str = "sentinel7q";
    let Some((_, completion)) =
        template.split(&[Message::new("user", "hello")], &Message::new("assistant", SENTINEL))?
    else {
        return Ok(None);
    };
    let Some(at) = completion.find(SENTINEL) else { return Ok(None) };
    let rest = completion[at + SENTINEL.len()..].trim();
    if rest.is_empty() {
        return Ok(None);
    }
    if let Some(id) = tokenizer.token_id(rest) {
        return Ok(Some(id));
    }
    let Some(&first) = tokenizer.encode(rest)?.first() else { return Ok(None) };
    // A special token decodes to nothing when special tokens are skipped.
    Ok(tokenizer.decode(&[first], true)?.is_empty().then_some(first))
}

/// The stop ids: EOS, the template's end-of-turn token, and `extra` (each must be one token).
pub fn stop_tokens(tokenizer: &TextTokenizer, template: Option<&ChatTemplate>, extra: &[String]) -> Result<Vec<u32>> {
    let mut stop: Vec<u32> = tokenizer.specials().eos.iter().map(|(_, id)| *id).collect();
    if let Some(t) = template {
        stop.extend(end_of_turn_token(tokenizer, t)?);
    }
    for s in extra {
        let id = match tokenizer.token_id(s) {
            Some(id) => id,
            None => match tokenizer.encode(s)?.as_slice() {
                [id] => *id,
                ids => {
                    return Err(TrainError::Config(format!(
                        "--stop `{s}`: not a single token of the tokenizer (it encodes to {} tokens)",
                        ids.len()
                    )));
                }
            },
        };
        stop.push(id);
    }
    stop.sort_unstable();
    stop.dedup();
    Ok(stop)
}

/// The prompt's token ids: rendered with `template` and the generation prompt (a text prompt
/// as one user turn), or, without a template, the text as it is; BOS by the tokenizer's rule.
pub fn encode_prompt(tokenizer: &TextTokenizer, template: Option<&ChatTemplate>, prompt: &Prompt) -> Result<Vec<u32>> {
    let text = match (template, prompt) {
        (Some(t), Prompt::Text(s)) => t.render(&[Message::new("user", s)], true)?,
        (Some(t), Prompt::Messages(m)) => t.render(m, true)?,
        (None, Prompt::Text(s)) => s.clone(),
        (None, Prompt::Messages(_)) => {
            return Err(TrainError::Config(
                "a message-list prompt needs a chat template (the tokenizer's or --template)".into(),
            ));
        }
    };
    Ok(tokenizer.with_bos(tokenizer.encode(&text)?))
}

/// Generates a completion for each prompt, `opts.batch_size` prompts at a time (in file
/// order), and writes one JSON line per prompt to `out` as soon as its batch is done. Returns
/// the generations.
pub fn generate_all(
    model: &LoadedModel,
    template: Option<&ChatTemplate>,
    prompts: &[Prompt],
    opts: &GenerateOptions,
    out: &mut dyn Write,
) -> Result<Vec<Generation>> {
    if opts.batch_size == 0 {
        return Err(TrainError::Config("--batch-size: must be at least 1".into()));
    }
    let stop = stop_tokens(&model.tokenizer, template, &opts.extra_stop)?;
    let context = max_positions(model.lm.config());
    let mut done = Vec::with_capacity(prompts.len());
    for (b, batch) in prompts.chunks(opts.batch_size).enumerate() {
        let first = b * opts.batch_size;
        let mut ids = Vec::with_capacity(batch.len());
        for (k, prompt) in batch.iter().enumerate() {
            let encoded = encode_prompt(&model.tokenizer, template, prompt)?;
            model.check_ids(&encoded, &|| format!("prompt {}", first + k + 1))?;
            ids.push(encoded);
        }
        let m = model.lm.model();
        let news = if opts.temperature > 0.0 {
            let seeds: Vec<u64> = (first..first + batch.len()).map(|i| opts.seed.wrapping_add(i as u64)).collect();
            m.generate_sampled_batch(&ids, opts.max_new_tokens, &stop, opts.temperature, &seeds)?
        } else {
            m.generate_greedy_batch(&ids, opts.max_new_tokens, &stop)?
        };
        for ((prompt, ids), new) in batch.iter().zip(&ids).zip(news) {
            let stopped = new.last().is_some_and(|t| stop.contains(t));
            let finish_reason = if stopped {
                "stop"
            } else if new.len() >= opts.max_new_tokens {
                "length"
            } else {
                debug_assert!(ids.len() + new.len() >= context);
                "context"
            };
            let text_ids = if stopped { &new[..new.len() - 1] } else { &new[..] };
            let generation = Generation {
                prompt: prompt.clone(),
                completion: model.tokenizer.decode(text_ids, false)?,
                tokens: new.len(),
                finish_reason,
            };
            let line = serde_json::to_string(&generation).map_err(|e| TrainError::Config(e.to_string()))?;
            writeln!(out, "{line}").map_err(|source| TrainError::Io { path: "output".into(), source })?;
            done.push(generation);
        }
        out.flush().map_err(|source| TrainError::Io { path: "output".into(), source })?;
    }
    Ok(done)
}
