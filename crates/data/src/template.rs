//! Chat templates: Hugging Face `chat_template` Jinja strings rendered with minijinja (with
//! Jinja2's `trim_blocks` / `lstrip_blocks`, as transformers sets them), and built-in Llama 3,
//! Gemma and ChatML templates for tokenizers that ship none.

use minijinja::{Environment, ErrorKind, context};
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::example::Message;

/// The built-in templates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuiltinTemplate {
    /// `<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>`, after `bos_token`.
    Llama3,
    /// `<start_of_turn>user\ncontent<end_of_turn>\n`, assistant as `model`, a system message
    /// folded into the first user turn, after `bos_token`.
    Gemma,
    /// `<|im_start|>role\ncontent<|im_end|>\n` (SmolLM2, Qwen), no BOS.
    Chatml,
}

const LLAMA3: &str = "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n\
{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}";

const GEMMA: &str = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = (messages[0]['content'] | trim) ~ '\\n\\n' %}\
{% set turns = messages[1:] %}{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}\
{% for m in turns %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n\
{{ (system if loop.first else '') ~ (m['content'] | trim) }}<end_of_turn>\n{% endfor %}\
{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}";

const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}\
{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

impl BuiltinTemplate {
    /// The Jinja source.
    pub fn source(self) -> &'static str {
        match self {
            Self::Llama3 => LLAMA3,
            Self::Gemma => GEMMA,
            Self::Chatml => CHATML,
        }
    }

    /// Special tokens the template writes, which the tokenizer must know as single tokens.
    pub fn required_tokens(self) -> &'static [&'static str] {
        match self {
            Self::Llama3 => &["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
            Self::Gemma => &["<start_of_turn>", "<end_of_turn>"],
            Self::Chatml => &["<|im_start|>", "<|im_end|>"],
        }
    }
}

/// A compiled chat template with the special-token strings it is rendered with.
pub struct ChatTemplate {
    name: String,
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    required: Vec<String>,
    source: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("name", &self.name).finish()
    }
}

impl ChatTemplate {
    /// Compiles `source` (a Hugging Face `chat_template`); `bos_token` / `eos_token` are the
    /// strings the template may reference.
    pub fn new(name: &str, source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        });
        // Templates that print today's date get a fixed one, so renders are reproducible.
        env.add_function("strftime_now", |_format: String| "26 Jul 2024".to_string());
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| DataError::Template { template: name.to_string(), detail: describe(&e) })?;
        Ok(Self {
            name: name.to_string(),
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            required: Vec::new(),
            source: source.to_string(),
        })
    }

    /// A built-in template.
    pub fn builtin(which: BuiltinTemplate, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut t = Self::new(&format!("{which:?}").to_lowercase(), which.source(), bos_token, eos_token)?;
        t.required = which.required_tokens().iter().map(|s| s.to_string()).collect();
        Ok(t)
    }

    /// The template's name (for messages).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The BOS string the template renders (may be empty).
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    /// Special tokens the template writes (known for built-ins; the BOS/EOS strings otherwise).
    pub fn required_tokens(&self) -> Vec<String> {
        let mut out = self.required.clone();
        for (token, variable) in [(&self.bos_token, "bos_token"), (&self.eos_token, "eos_token")] {
            if !token.is_empty() && self.source.contains(variable) {
                out.push(token.clone());
            }
        }
        out
    }

    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the model starts.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_any(messages, add_generation_prompt)
    }

    /// [`render`](Self::render) for any serializable message list (also borrowed messages).
    fn render_any<M: serde::Serialize + ?Sized>(&self, messages: &M, add_generation_prompt: bool) -> Result<String> {
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| DataError::Template { template: self.name.clone(), detail: describe(&e) })?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| DataError::Template { template: self.name.clone(), detail: describe(&e) })
    }

    /// Splits a conversation into the prompt text (ending with the generation prompt) and the
    /// completion text (the final message as the template writes it, through its end-of-turn
    /// marker, without trailing whitespace). `None` if the template's prompt rendering is not a
    /// prefix of its full rendering.
    pub fn split(&self, prompt: &[Message], completion: &Message) -> Result<Option<(String, String)>> {
        let prompt_text = self.render(prompt, true)?;
        Ok(self.completion_text(prompt, &prompt_text, completion)?.map(|completion| (prompt_text, completion)))
    }

    /// [`split`](Self::split) for a chosen and a rejected completion of one prompt, rendering
    /// the prompt once: `(prompt, chosen, rejected)`, or `None` as there.
    pub fn split_pair(
        &self,
        prompt: &[Message],
        chosen: &Message,
        rejected: &Message,
    ) -> Result<Option<(String, String, String)>> {
        let prompt_text = self.render(prompt, true)?;
        let (Some(c), Some(r)) = (
            self.completion_text(prompt, &prompt_text, chosen)?,
            self.completion_text(prompt, &prompt_text, rejected)?,
        ) else {
            return Ok(None);
        };
        Ok(Some((prompt_text, c, r)))
    }

    /// The rendering of `prompt` + `completion` after `prompt_text`, trailing whitespace dropped.
    fn completion_text(&self, prompt: &[Message], prompt_text: &str, completion: &Message) -> Result<Option<String>> {
        let all: Vec<&Message> = prompt.iter().chain([completion]).collect();
        let full = self.render_any(&all, false)?;
        Ok(full.strip_prefix(prompt_text).map(|rest| rest.trim_end().to_string()))
    }
}

fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        s.push_str(&format!(": {inner}"));
        source = inner.source();
    }
    s
}
