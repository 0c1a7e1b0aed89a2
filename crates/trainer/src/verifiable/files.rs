//! The task on disk (the `slime-trainer task verifiable` command):
//!
//! | file | content |
//! |---|---|
//! | `train.parquet` | training pairs, TRL conversational layout (`prompt`, `chosen`, `rejected` message lists) |
//! | `heldout.parquet` | the held-out pairs, same layout; row `i` is line `i` of `heldout.jsonl` |
//! | `heldout.jsonl` | one held-out problem per line: `{"prompt", "skill", "answer", "key"}`; `slime-trainer generate --prompts` reads it as it is |
//! | `task.json` | the seed, the counts per split and skill, the answer format |

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use slime_data::{ColumnNames, Layout, PreferenceExample, write_preferences};

use super::{DEFAULT_HELDOUT, DEFAULT_TRAIN, Problem, Skill, Verdict, check, generate};
use crate::{Result, TrainError};

/// One line of `heldout.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldOutPrompt {
    /// The user turn.
    pub prompt: String,
    /// Which skill.
    pub skill: Skill,
    /// The correct value, in canonical form.
    pub answer: String,
    /// The skill and its parameters.
    pub key: String,
}

impl HeldOutPrompt {
    /// Judges a generated completion of this prompt; `ended`: generation stopped at the
    /// end-of-turn token (`finish_reason == "stop"`).
    pub fn check(&self, completion: &str, ended: bool) -> Verdict {
        check(self.skill, &self.answer, completion, ended)
    }
}

impl From<&Problem> for HeldOutPrompt {
    fn from(p: &Problem) -> Self {
        Self { prompt: p.prompt.clone(), skill: p.skill, answer: p.answer.clone(), key: p.key.clone() }
    }
}

/// What [`write_task`] wrote (also saved as `task.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSummary {
    /// The generator's seed.
    pub seed: u64,
    /// Training pairs.
    pub train: usize,
    /// Held-out prompts (and pairs).
    pub heldout: usize,
    /// `(training, held-out)` problems per skill.
    pub per_skill: BTreeMap<Skill, (usize, usize)>,
    /// The answer format every prompt asks for.
    pub answer_format: String,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io { path: path.display().to_string(), source }
}

/// Generates the task (`train` pairs, `heldout` prompts, from `seed`) and writes its files into
/// `dir` (created if missing).
pub fn write_task(dir: &Path, seed: u64, train: usize, heldout: usize) -> Result<TaskSummary> {
    if train == 0 || heldout == 0 {
        return Err(TrainError::Config(format!(
            "verifiable task: --train {train} --heldout {heldout}: expected at least 1 of each"
        )));
    }
    let task = generate(train, heldout, seed)?;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let pairs = |problems: &[Problem]| problems.iter().map(Problem::preference).collect::<Vec<PreferenceExample>>();
    let names = ColumnNames::default();
    write_preferences(dir.join("train.parquet"), &pairs(&task.train), Layout::Conversational, &names, 1024)?;
    write_preferences(dir.join("heldout.parquet"), &pairs(&task.heldout), Layout::Conversational, &names, 1024)?;
    let path = dir.join("heldout.jsonl");
    let mut lines = String::new();
    for p in &task.heldout {
        let line = serde_json::to_string(&HeldOutPrompt::from(p))
            .map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))?;
        lines.push_str(&line);
        lines.push('\n');
    }
    std::fs::write(&path, lines).map_err(io(&path))?;
    let mut per_skill: BTreeMap<Skill, (usize, usize)> = BTreeMap::new();
    for p in &task.train {
        per_skill.entry(p.skill).or_default().0 += 1;
    }
    for p in &task.heldout {
        per_skill.entry(p.skill).or_default().1 += 1;
    }
    let summary = TaskSummary {
        seed,
        train,
        heldout,
        per_skill,
        answer_format: "last line `Answer: <value>`, ended by the end-of-turn token".into(),
    };
    let path = dir.join("task.json");
    let json = serde_json::to_string_pretty(&summary).map_err(|e| TrainError::Config(format!("{e}")))?;
    std::fs::write(&path, json + "\n").map_err(io(&path))?;
    Ok(summary)
}

/// Reads `heldout.jsonl`; a bad line is an error naming the file and the line.
pub fn read_heldout(path: &Path) -> Result<Vec<HeldOutPrompt>> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        out.push(serde_json::from_str(line).map_err(|e| {
            TrainError::Config(format!(
                "{}, line {}: {e}; expected {{\"prompt\", \"skill\", \"answer\", \"key\"}}",
                path.display(),
                n + 1
            ))
        })?);
    }
    Ok(out)
}

/// `slime-trainer task ...`.
#[derive(Debug, clap::Subcommand)]
pub enum TaskCommand {
    /// Write the verifiable task: natural-language questions with program-checked answers in
    /// the format `Answer: <value>` (six skills), as TRL conversational preference pairs
    /// (chosen: the correct value, rejected: a plausible wrong value, same format):
    /// train.parquet, heldout.parquet, heldout.jsonl (prompts with their answers, readable by
    /// `generate --prompts`) and task.json, into --out.
    Verifiable {
        /// Output directory (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Generator seed; the same seed and sizes give the same files.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Training pairs.
        #[arg(long, default_value_t = DEFAULT_TRAIN)]
        train: usize,
        /// Held-out prompts (disjoint from the training problems).
        #[arg(long, default_value_t = DEFAULT_HELDOUT)]
        heldout: usize,
    },
}

impl TaskCommand {
    /// Runs the command and prints what it wrote to `out`.
    pub fn run(&self, out: &mut impl Write) -> Result<TaskSummary> {
        match self {
            Self::Verifiable { out: dir, seed, train, heldout } => {
                let summary = write_task(dir, *seed, *train, *heldout)?;
                let per_skill: Vec<String> =
                    summary.per_skill.iter().map(|(s, (t, h))| format!("{} {t}/{h}", s.name())).collect();
                writeln!(
                    out,
                    "wrote {} training pairs and {} held-out prompts (seed {}) to {}; per skill (train/held-out): {}",
                    summary.train,
                    summary.heldout,
                    summary.seed,
                    dir.display(),
                    per_skill.join(", ")
                )
                .map_err(io(dir))?;
                Ok(summary)
            }
        }
    }
}
