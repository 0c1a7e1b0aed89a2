//! The verifiable task: the generator (deterministic, disjoint splits, right answers recomputed
//! here from the prompt text alone, a shared answer format), the checker on hand-written
//! completions, and the `task verifiable` command's files.

use std::collections::HashSet;
use std::process::Command;

use slime_data::{PreferenceExample, PreferenceReader, ReadOptions};
use slime_trainer::generate::{Prompt, read_prompts};
use slime_trainer::verifiable::{
    DEFAULT_HELDOUT, DEFAULT_TRAIN, Problem, Skill, TaskSummary, Verdict, check, generate, read_heldout, repetition,
};

/// Every integer in `text`, in order.
fn ints(text: &str) -> Vec<i64> {
    text.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse().expect("digits")).collect()
}

/// The question, without the format instruction.
fn question(p: &Problem) -> &str {
    p.prompt.split("\n\n").next().expect("question")
}

const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// Days since 1970-01-01 of a proleptic Gregorian date (era arithmetic, no month walking).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Metres, grams, millilitres or seconds per unit.
fn unit(name: &str) -> f64 {
    match name {
        "kilometres" => 1000.0,
        "metres" => 1.0,
        "centimetres" => 0.01,
        "millimetres" => 0.001,
        "kilograms" => 1000.0,
        "grams" => 1.0,
        "litres" => 1000.0,
        "millilitres" => 1.0,
        "days" => 86_400.0,
        "hours" => 3600.0,
        "minutes" => 60.0,
        "seconds" => 1.0,
        other => panic!("unknown unit {other}"),
    }
}

/// The answer recomputed from the question text alone.
fn recompute(p: &Problem) -> String {
    let q = question(p);
    let n = ints(q);
    match p.skill {
        Skill::Arithmetic => {
            let v = if q.contains("gives") {
                n[0] + n[1] - n[2]
            } else if q.contains("boxes of") {
                n[0] * n[1]
            } else if q.contains("equally") {
                assert_eq!(n[0] % n[1], 0, "{q}");
                n[0] / n[1]
            } else if q.contains("pages") {
                n[0] + n[1] + n[2]
            } else {
                assert!(q.contains("passengers"), "{q}");
                n[0] - n[1] + n[2]
            };
            v.to_string()
        }
        Skill::Sorting => {
            let mut v = n.clone();
            v.sort_unstable();
            if q.contains("largest to smallest") {
                v.reverse();
            }
            v.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
        }
        Skill::LetterCount => {
            let quoted: Vec<&str> = q.split('"').collect();
            let (letter, word) = (quoted[1], quoted[3]);
            word.matches(letter).count().to_string()
        }
        Skill::Weekday => {
            let start = DAYS.iter().position(|d| q.contains(&format!("Today is {d}."))).expect("start day") as i64;
            let shift = if q.contains("ago") { -n[0] } else { n[0] };
            DAYS[(start + shift).rem_euclid(7) as usize].to_string()
        }
        Skill::DateShift => {
            let month = MONTHS.iter().position(|m| q.contains(&format!("after {m} "))).expect("month") as i64 + 1;
            let (days, day, year) = (n[0], n[1], n[2]);
            let (y, m, d) = civil_from_days(days_from_civil(year, month, day) + days);
            format!("{y:04}-{m:02}-{d:02}")
        }
        Skill::UnitConversion => {
            let words: Vec<&str> = q.trim_end_matches('.').split(' ').collect();
            let (value, from, to) = (words[1].parse::<f64>().expect("value"), words[2], words[4]);
            let v = value * unit(from) / unit(to);
            let text = format!("{}", (v * 1e6).round() / 1e6);
            assert!((text.parse::<f64>().expect("number") - p.answer.parse::<f64>().expect("answer")).abs() < 1e-9);
            text
        }
    }
}

#[test]
fn date_arithmetic_of_the_test_is_itself_right() {
    assert_eq!(days_from_civil(1970, 1, 1), 0);
    assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    assert_eq!(civil_from_days(days_from_civil(2024, 2, 28) + 1), (2024, 2, 29));
    assert_eq!(civil_from_days(days_from_civil(2100, 2, 28) + 1), (2100, 3, 1));
    assert_eq!(civil_from_days(days_from_civil(1999, 12, 31) + 1), (2000, 1, 1));
}

#[test]
fn generation_is_deterministic_balanced_and_disjoint() {
    let task = generate(DEFAULT_TRAIN, DEFAULT_HELDOUT, 11).expect("generate");
    assert!(task.train.len() >= 2000 && task.heldout.len() >= 256);
    assert_eq!(task, generate(DEFAULT_TRAIN, DEFAULT_HELDOUT, 11).expect("again"));
    let other = generate(DEFAULT_TRAIN, DEFAULT_HELDOUT, 12).expect("seed 12");
    assert_ne!(task.train, other.train);
    assert_ne!(task.heldout, other.heldout);
    // The held-out split depends on the seed and its own size only.
    assert_eq!(generate(60, DEFAULT_HELDOUT, 11).expect("small").heldout, task.heldout);

    let keys: HashSet<&str> = task.train.iter().chain(&task.heldout).map(|p| p.key.as_str()).collect();
    assert_eq!(keys.len(), task.train.len() + task.heldout.len(), "a problem appears twice");
    let heldout_prompts: HashSet<&str> = task.heldout.iter().map(|p| p.prompt.as_str()).collect();
    assert!(task.train.iter().all(|p| !heldout_prompts.contains(p.prompt.as_str())));

    for split in [&task.train, &task.heldout] {
        for skill in Skill::ALL {
            let n = split.iter().filter(|p| p.skill == skill).count();
            assert!(n.abs_diff(split.len() / Skill::ALL.len()) <= 1, "{skill:?}: {n} of {}", split.len());
        }
    }
}

#[test]
fn every_answer_is_right_and_every_wrong_answer_is_wrong_in_the_same_format() {
    let task = generate(DEFAULT_TRAIN, DEFAULT_HELDOUT, 5).expect("generate");
    for p in task.train.iter().chain(&task.heldout) {
        assert_eq!(p.answer, recompute(p), "{p:?}");
        assert_ne!(p.answer, p.wrong, "{p:?}");
        assert!(p.prompt.ends_with("`."), "{p:?}");
        assert!(p.prompt.contains("Reply with a single line of the form `Answer: "), "{p:?}");
        // Same format, different value: both valid, only the chosen one correct.
        assert_eq!(p.chosen(), format!("Answer: {}", p.answer));
        assert_eq!(p.rejected(), format!("Answer: {}", p.wrong));
        let chosen = p.check(&p.chosen(), true);
        assert_eq!((chosen.format_valid, chosen.correct), (true, true), "{p:?}");
        let rejected = p.check(&p.rejected(), true);
        assert_eq!((rejected.format_valid, rejected.correct), (true, false), "{p:?}");
        let PreferenceExample::Chat { prompt, chosen, rejected } = p.preference() else {
            panic!("conversational");
        };
        assert_eq!((prompt.len(), prompt[0].role.as_str(), prompt[0].content.as_str()), (1, "user", p.prompt.as_str()));
        assert_eq!((chosen.role.as_str(), rejected.role.as_str()), ("assistant", "assistant"));
    }
    // Letter counting includes letters that do not occur (answer 0) and repeated letters.
    let counts: HashSet<String> =
        task.train.iter().filter(|p| p.skill == Skill::LetterCount).map(|p| p.answer.clone()).collect();
    assert!(counts.contains("0") && counts.contains("3"), "{counts:?}");
}

fn verdict(format_valid: bool, correct: bool) -> (bool, bool) {
    (format_valid, correct)
}

fn judge(skill: Skill, answer: &str, text: &str, ended: bool) -> (bool, bool) {
    let v: Verdict = check(skill, answer, text, ended);
    (v.format_valid, v.correct)
}

#[test]
fn checker_on_hand_written_completions() {
    use Skill::*;
    // Correct and well formatted; a worked line before the answer is allowed.
    assert_eq!(judge(Arithmetic, "33", "Answer: 33", true), verdict(true, true));
    assert_eq!(judge(Arithmetic, "33", "17 + 25 - 9 = 33\nAnswer: 33\n", true), verdict(true, true));
    assert_eq!(judge(Sorting, "3, 7, 19", "Answer: 3, 7, 19", true), verdict(true, true));
    assert_eq!(judge(Weekday, "Sunday", "Answer: Sunday", true), verdict(true, true));
    assert_eq!(judge(DateShift, "2021-04-17", "Answer: 2021-04-17", true), verdict(true, true));
    assert_eq!(judge(UnitConversion, "4.2", "Answer: 4.2", true), verdict(true, true));
    assert_eq!(judge(LetterCount, "0", "Answer: 0", true), verdict(true, true));
    // Wrong value, right format.
    assert_eq!(judge(Arithmetic, "33", "Answer: 35", true), verdict(true, false));
    assert_eq!(judge(Sorting, "3, 7, 19", "Answer: 7, 3, 19", true), verdict(true, false));
    assert_eq!(judge(Weekday, "Sunday", "Answer: Monday", true), verdict(true, false));
    assert_eq!(judge(DateShift, "2021-04-17", "Answer: 2021-04-16", true), verdict(true, false));
    // Right value, malformed: the checker reads it leniently but the format fails.
    for text in [
        "answer: 33",             // lower case
        "Answer:33",              // no space
        "Answer:  33",            // two spaces
        "Answer: 33.",            // trailing period
        "Answer: 033",            // not canonical
        "Answer: 33\nThanks!",    // text after the answer line
        "Answer: 30\nAnswer: 33", // two answer lines
        "  Answer: 33 and more",  // not a bare value
    ] {
        let (valid, _) = judge(Arithmetic, "33", text, true);
        assert!(!valid, "{text:?} passed as well formatted");
    }
    assert_eq!(judge(Arithmetic, "33", "Answer: 33.", true), verdict(false, true));
    assert_eq!(judge(Arithmetic, "33", "answer: 33", true), verdict(false, true));
    assert_eq!(judge(Arithmetic, "33", "Answer: 30\nAnswer: 33", true), verdict(false, true));
    assert_eq!(judge(Sorting, "3, 7, 19", "Answer: 3,7,19", true), verdict(false, true));
    assert_eq!(judge(Weekday, "Sunday", "Answer: sunday", true), verdict(false, true));
    assert_eq!(judge(UnitConversion, "4.2", "Answer: 4.20", true), verdict(true, true));
    assert_eq!(judge(UnitConversion, "4.2", "Answer: 4,2", true), verdict(false, false));
    assert_eq!(judge(DateShift, "2021-02-28", "Answer: 2021-02-29", true), verdict(false, false));
    // Cut at the token limit: never well formatted, even if the text so far is.
    assert_eq!(judge(Arithmetic, "33", "Answer: 33", false), verdict(false, true));
    // No answer line at all, or nothing.
    assert_eq!(judge(Arithmetic, "33", "The answer is 33.", true), verdict(false, false));
    assert_eq!(judge(Arithmetic, "33", "", true), verdict(false, false));
}

#[test]
fn repetition_is_the_fraction_of_repeated_trigrams() {
    assert_eq!(repetition("Answer: 33"), 0.0);
    assert_eq!(repetition("the quick brown fox jumps over the lazy dog"), 0.0);
    // 9 words, 7 trigrams, 3 distinct: 1 - 3/7.
    let r = repetition("the cat sat the cat sat the cat sat");
    assert!((r - (1.0 - 3.0 / 7.0)).abs() < 1e-12, "{r}");
    // A long loop tends to 1; case and spacing do not hide it.
    let looped = "Answer: 3 ".repeat(200);
    assert!(repetition(&looped) > 0.98);
    assert_eq!(repetition("A b C a B c"), repetition("a b c a b c"));
    let v = check(Skill::Arithmetic, "3", &looped, false);
    assert!(!v.format_valid && v.repetition > 0.98);
}

#[test]
fn the_task_command_writes_readable_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("task");
    let run = Command::new(env!("CARGO_BIN_EXE_slime-trainer"))
        .args(["task", "verifiable", "--seed", "3", "--train", "60", "--heldout", "12", "--out"])
        .arg(&out)
        .output()
        .expect("spawn");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(stdout.contains("wrote 60 training pairs and 12 held-out prompts (seed 3)"), "{stdout}");

    let task = generate(60, 12, 3).expect("generate");
    let read = |name: &str| -> Vec<PreferenceExample> {
        PreferenceReader::open(out.join(name), ReadOptions::default())
            .expect("open")
            .map(|r| r.expect("row").example)
            .collect()
    };
    let expected = |ps: &[Problem]| ps.iter().map(Problem::preference).collect::<Vec<_>>();
    assert_eq!(read("train.parquet"), expected(&task.train));
    assert_eq!(read("heldout.parquet"), expected(&task.heldout));

    let heldout = read_heldout(&out.join("heldout.jsonl")).expect("heldout.jsonl");
    assert_eq!(heldout.len(), 12);
    for (h, p) in heldout.iter().zip(&task.heldout) {
        assert_eq!((&h.prompt, h.skill, &h.answer), (&p.prompt, p.skill, &p.answer));
        assert!(h.check(&p.chosen(), true).correct);
    }
    // `generate --prompts` reads the same file as one user turn per line.
    let prompts = read_prompts(&out.join("heldout.jsonl")).expect("prompts");
    assert_eq!(prompts[0], Prompt::Text(task.heldout[0].prompt.clone()));

    let summary: TaskSummary =
        serde_json::from_str(&std::fs::read_to_string(out.join("task.json")).expect("task.json")).expect("json");
    assert_eq!((summary.seed, summary.train, summary.heldout), (3, 60, 12));
    assert_eq!(summary.per_skill[&Skill::Weekday], (10, 2));

    // Bad sizes and a bad held-out line are errors that say what is wrong.
    let zero = Command::new(env!("CARGO_BIN_EXE_slime-trainer"))
        .args(["task", "verifiable", "--train", "0", "--out"])
        .arg(dir.path().join("zero"))
        .output()
        .expect("spawn");
    assert!(!zero.status.success());
    assert!(String::from_utf8_lossy(&zero.stderr).contains("expected at least 1 of each"));
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"hi\", \"skill\": \"poetry\", \"answer\": \"1\", \"key\": \"k\"}\n")
        .expect("write");
    let e = read_heldout(&bad).expect_err("unknown skill").to_string();
    assert!(e.contains("bad.jsonl, line 1") && e.contains("poetry"), "{e}");
}
