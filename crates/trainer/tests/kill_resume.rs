//! The real `slime-trainer` binary, killed with SIGKILL after a checkpoint and resumed, ends
//! with a model byte-identical to an uninterrupted run's, and the same logs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// SFT 6 steps, then DPO with SAGE selection (reference log-probs, the draw RNG, the pool and
/// the previous margins all have to survive a restart) with gradient accumulation, 6 steps;
/// a checkpoint every 2 steps. SAGE refreshes every 3 steps, so a checkpoint falls inside a
/// refresh period.
const CONFIG: &str = r#"
name = "kill-resume"
seed = 3

[model]
hidden = 16
layers = 1

[data]
pairs = 60
eval_pairs = 8

[sft]
steps = 6
batch_size = 4

[preference]
steps = 6
batch_size = 2
grad_accum = 2
objective = { type = "dpo", beta = 0.5 }
selection = "sage"
sage = { pool_size = 12, refresh_every = 3 }

[eval]
every = 2
generations = 2
max_new_tokens = 6

[checkpoint]
every = 2
keep_last = 2
"#;

fn trainer() -> Command {
    Command::new(env!("CARGO_BIN_EXE_slime-trainer"))
}

fn train(config: &Path, run_dir: &Path, resume: bool, delay_ms: Option<u64>) -> Command {
    let mut cmd = trainer();
    cmd.arg("train").arg("--config").arg(config).arg("--run-dir").arg(run_dir).args(["--progress", "lines"]);
    if resume {
        cmd.arg("--resume");
    }
    if let Some(ms) = delay_ms {
        cmd.env("SLIME_TRAINER_STEP_DELAY_MS", ms.to_string());
    }
    cmd.env_remove("SLIME_TRAINER_INJECT_FAULT");
    cmd
}

fn finish(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn slime-trainer");
    assert!(out.status.success(), "slime-trainer failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    out
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The checkpoint `latest` points at and its stage.
fn latest_stage(run_dir: &Path) -> Option<(String, String)> {
    let root = run_dir.join("checkpoints");
    let name = std::fs::read_to_string(root.join("latest")).ok()?;
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join(name.trim()).join("state.json")).ok()?).ok()?;
    Some((name.trim().to_string(), state["stage"].as_str()?.to_string()))
}

/// Waits until a checkpoint of `stage` is the run's latest, then SIGKILLs the run.
fn kill_after_checkpoint(mut child: Child, run_dir: &Path, stage: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if latest_stage(run_dir).is_some_and(|(_, s)| s == stage) {
            break;
        }
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("the run ended ({status}) before a {stage} checkpoint appeared; the kill test did not interrupt it");
        }
        assert!(Instant::now() < deadline, "no {stage} checkpoint within 120 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().expect("SIGKILL");
    let status = child.wait().expect("wait");
    assert!(!status.success(), "killed run reported success");
    assert!(!run_dir.join("result.json").exists(), "the run finished before the kill");
}

/// Names of the complete checkpoints, sorted.
fn checkpoints(run_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(run_dir.join("checkpoints"))
        .expect("checkpoints")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-") && !n.ends_with(".tmp"))
        .collect();
    names.sort();
    names
}

/// metrics.jsonl without the wall-clock field.
fn metrics_without_timing(run_dir: &Path) -> Vec<serde_json::Value> {
    String::from_utf8(read(&run_dir.join("metrics.jsonl")))
        .expect("utf8")
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).expect("json line");
            v.as_object_mut().expect("object").remove("tokens_per_second");
            v
        })
        .collect()
}

fn write_config(dir: &Path) -> PathBuf {
    let path = dir.join("run.toml");
    std::fs::write(&path, CONFIG).expect("write config");
    path
}

#[test]
fn sigkill_then_resume_gives_a_byte_identical_model() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = write_config(tmp.path());
    let (whole, cut) = (tmp.path().join("whole"), tmp.path().join("cut"));

    let started = Instant::now();
    finish(&mut train(&config, &whole, false, None));
    let uninterrupted = started.elapsed();

    // Killed during SFT, right after its first checkpoint.
    let child =
        train(&config, &cut, false, Some(150)).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn");
    kill_after_checkpoint(child, &cut, "sft");
    // Resumed, and killed again during the preference stage.
    let child =
        train(&config, &cut, true, Some(150)).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn");
    kill_after_checkpoint(child, &cut, "preference");
    // The newest checkpoint after the kill (normally the one seen; a slow poll may have let
    // the run write one more before the kill landed).
    let (second, stage) = latest_stage(&cut).expect("a checkpoint");
    assert_eq!(stage, "preference");
    assert!(second.as_str() > "step-000006", "{second} is a preference checkpoint (global step > 6 SFT steps)");
    // One flipped byte in the newest checkpoint's weights: the resume skips it, says why, and
    // continues from the one before (keep_last = 2 leaves it on disk).
    let before = checkpoints(&cut).into_iter().rfind(|n| n.as_str() < second.as_str()).expect("an older one");
    let weights = cut.join("checkpoints").join(&second).join("model.safetensors");
    let mut bytes = read(&weights);
    let last = bytes.len() - 1;
    bytes[last] ^= 0x10;
    std::fs::write(&weights, bytes).expect("flip a byte");
    // Resumed to the end.
    let out = finish(&mut train(&config, &cut, true, None));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("skipped checkpoint {second}: ")) && stderr.contains("SHA-256 mismatch"),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("resuming from checkpoint {before}")), "{stderr}");

    for file in ["model/model.safetensors", "sft-model/model.safetensors", "eval.jsonl", "model/config.json"] {
        assert!(read(&whole.join(file)) == read(&cut.join(file)), "{file} differs after kill and resume");
    }
    assert_eq!(metrics_without_timing(&whole), metrics_without_timing(&cut));
    // keep_last = 2: two complete checkpoints on disk at the end, the newest first.
    assert_eq!(checkpoints(&cut), ["step-000010", "step-000012"]);
    assert_eq!(checkpoints(&cut), checkpoints(&whole));
    let result = |d: &Path| serde_json::from_slice::<serde_json::Value>(&read(&d.join("result.json"))).expect("json");
    assert_eq!(result(&whole), result(&cut));

    // --resume on a finished run says so and changes nothing.
    let before = read(&cut.join("model/model.safetensors"));
    let metrics_before = read(&cut.join("metrics.jsonl"));
    let out = finish(&mut train(&config, &cut, true, None));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already finished"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(before, read(&cut.join("model/model.safetensors")));
    assert_eq!(metrics_before, read(&cut.join("metrics.jsonl")));
    eprintln!(
        "uninterrupted run: {:.2} s, whole test: {:.2} s",
        uninterrupted.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

/// Mode bits of a file.
#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o777
}

const SMALL: &str = "[model]\nhidden = 16\nlayers = 1\n[data]\npairs = 30\neval_pairs = 4\n[sft]\nsteps = 2\nbatch_size = 4\n\
                     [preference]\nsteps = 2\nbatch_size = 2\n[eval]\ngenerations = 1\nmax_new_tokens = 4\n\
                     [checkpoint]\nevery = 1\n";

/// A second trainer on a directory in use stops at once, naming the first one's pid, and does
/// not touch the run; once the first is killed, the directory is free again.
#[test]
fn a_second_trainer_on_the_same_run_directory_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = write_config(tmp.path());
    let dir = tmp.path().join("run");
    let mut first =
        train(&config, &dir, false, Some(300)).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(120);
    while latest_stage(&dir).is_none() {
        assert!(first.try_wait().expect("try_wait").is_none(), "the first run ended early");
        assert!(Instant::now() < deadline, "no checkpoint within 120 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    let metrics_before = read(&dir.join("metrics.jsonl"));
    for resume in [false, true] {
        let out = train(&config, &dir, resume, None).output().expect("spawn");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "a second trainer ran on a directory in use");
        assert!(stderr.contains(&format!("in use by pid {}", first.id())), "{stderr}");
    }
    // The first run went on undisturbed (its log only grew) and is still running.
    assert!(read(&dir.join("metrics.jsonl")).starts_with(&metrics_before));
    assert!(first.try_wait().expect("try_wait").is_none());
    first.kill().expect("SIGKILL");
    first.wait().expect("wait");
    // The lock died with its process.
    let out = finish(&mut train(&config, &dir, true, None));
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming from checkpoint"));
    let lines = String::from_utf8(read(&dir.join("metrics.jsonl"))).expect("utf8").lines().count();
    assert_eq!(lines, 12, "one metrics line per step of the 6 + 6 step run");
}

/// A fresh run whose inputs are wrong fails before it changes anything of the earlier run in
/// the same directory.
#[test]
fn a_fresh_run_with_a_bad_input_leaves_the_earlier_run_intact() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("run.toml");
    std::fs::write(&config, SMALL).expect("write");
    let dir = tmp.path().join("run");
    finish(&mut train(&config, &dir, false, None));
    let snapshot = |d: &Path| -> Vec<(String, Vec<u8>)> {
        let mut files = Vec::new();
        let mut stack = vec![d.to_path_buf()];
        while let Some(p) = stack.pop() {
            for e in std::fs::read_dir(&p).expect("read_dir") {
                let path = e.expect("entry").path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    files.push((path.display().to_string(), read(&path)));
                }
            }
        }
        files.sort();
        files
    };
    let before = snapshot(&dir);
    assert!(before.iter().any(|(p, _)| p.ends_with("model/model.safetensors")));
    for (extra, needle) in [
        ("init = \"no/such/model\"\n", "init = no/such/model: does not exist"),
        ("[data]\npairs = 1000000000000\n", "data.pairs = 1000000000000"),
    ] {
        let bad = tmp.path().join("bad.toml");
        let text = if extra.starts_with('[') { extra.to_string() } else { format!("{extra}{SMALL}") };
        std::fs::write(&bad, text).expect("write");
        let out = train(&bad, &dir, false, None).output().expect("spawn");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra}: {stderr}");
        assert!(stderr.contains(needle), "{extra}: {stderr}");
        assert!(snapshot(&dir) == before, "{extra}: the earlier run was changed");
    }
    // A file where the run directory should be.
    let file = tmp.path().join("file");
    std::fs::write(&file, "x").expect("write");
    let out = train(&config, &file, false, None).output().expect("spawn");
    assert!(String::from_utf8_lossy(&out.stderr).contains("is a file; expected a directory"));
}

/// Every file a run leaves, the weights included, has the mode the umask gives (not 0600).
#[cfg(unix)]
#[test]
fn run_files_follow_the_umask() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("run.toml");
    std::fs::write(&config, SMALL).expect("write");
    let dir = tmp.path().join("run");
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg("umask 022 && exec \"$0\" \"$@\"").arg(env!("CARGO_BIN_EXE_slime-trainer"));
    cmd.arg("train").arg("--config").arg(&config).arg("--run-dir").arg(&dir).args(["--progress", "off"]);
    finish(&mut cmd);
    let latest = latest_stage(&dir).expect("a checkpoint").0;
    for file in [
        "model/model.safetensors".to_string(),
        "model/config.json".into(),
        "sft-model/model.safetensors".into(),
        "result.json".into(),
        "config.toml".into(),
        "metrics.jsonl".into(),
        format!("checkpoints/{latest}/model.safetensors"),
        format!("checkpoints/{latest}/optimizer.safetensors"),
        format!("checkpoints/{latest}/state.json"),
    ] {
        assert_eq!(mode(&dir.join(&file)), 0o644, "{file}: {:o}", mode(&dir.join(&file)));
    }
}

#[test]
fn resume_without_a_checkpoint_starts_fresh() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("run.toml");
    std::fs::write(
        &config,
        "[model]\nhidden = 16\nlayers = 1\n[data]\npairs = 30\neval_pairs = 4\n[sft]\nsteps = 2\nbatch_size = 4\n\
         [preference]\nsteps = 1\nbatch_size = 2\n[eval]\ngenerations = 1\nmax_new_tokens = 4\n",
    )
    .expect("write");
    let dir = tmp.path().join("run");
    let out = finish(&mut train(&config, &dir, true, None));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no checkpoint, starting fresh"), "{stderr}");
    assert!(dir.join("result.json").is_file());
}

#[test]
fn selection_flag_overrides_the_config_and_is_recorded() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("run.toml");
    std::fs::write(
        &config,
        "[model]\nhidden = 16\nlayers = 1\n[data]\npairs = 30\neval_pairs = 4\n[sft]\nsteps = 0\n\
         [preference]\nsteps = 2\nbatch_size = 2\nsage = { pool_size = 6, refresh_every = 1 }\n\
         [eval]\ngenerations = 1\nmax_new_tokens = 4\n",
    )
    .expect("write");
    let dir = tmp.path().join("run");
    finish(train(&config, &dir, false, None).args(["--selection", "sage"]));
    let resolved = String::from_utf8(read(&dir.join("config.toml"))).expect("utf-8");
    assert!(resolved.contains("selection = \"sage\""), "{resolved}");
    let bad = train(&config, &dir, false, None).args(["--selection", "best"]).output().expect("spawn");
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("uniform"));
}

#[test]
fn out_of_range_values_are_rejected_before_any_work() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for (text, field) in [
        ("[preference]\ngrad_accum = 0\n", "preference.grad_accum"),
        ("[checkpoint]\nkeep_last = 0\n", "checkpoint.keep_last"),
        ("[sft.schedule]\nlr = 0.0\n", "sft.schedule.lr"),
        ("[checkpoint]\nevery = 2\nkeep = 1\n", "keep"),
        ("[data]\npairs = 1000000000000\n", "data.pairs"),
        ("init = \"missing/model\"\n", "init = missing/model: does not exist"),
    ] {
        let config = tmp.path().join("bad.toml");
        std::fs::write(&config, text).expect("write");
        let dir = tmp.path().join("never");
        let out =
            trainer().arg("train").arg("--config").arg(&config).arg("--run-dir").arg(&dir).output().expect("spawn");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{text}: not a plain error exit: {stderr}");
        assert!(stderr.contains(field), "{text}: error does not name `{field}`: {stderr}");
        assert!(!dir.exists(), "{text}: the run directory was created before validation");
    }
}

#[test]
fn injected_fault_names_step_and_term_and_the_run_resumes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("run.toml");
    std::fs::write(
        &config,
        "[model]\nhidden = 16\nlayers = 1\n[data]\npairs = 30\neval_pairs = 4\n[sft]\nsteps = 0\n\
         [preference]\nsteps = 4\nbatch_size = 2\n[eval]\ngenerations = 1\nmax_new_tokens = 4\n\
         [checkpoint]\nevery = 2\n",
    )
    .expect("write");
    let dir = tmp.path().join("run");
    let out = train(&config, &dir, false, None)
        .env("SLIME_TRAINER_INJECT_FAULT", "preference:3:logps")
        .output()
        .expect("spawn");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("step 3 (run step 3): preference loss term `slime/"), "{stderr}");
    assert!(stderr.contains("is not finite (NaN); the last checkpoint, step-000002, is intact"), "{stderr}");
    assert_eq!(latest_stage(&dir), Some(("step-000002".to_string(), "preference".to_string())));
    let out = finish(&mut train(&config, &dir, true, None));
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming from checkpoint step-000002"));
    let whole = tmp.path().join("whole");
    finish(&mut train(&config, &whole, false, None));
    assert!(read(&whole.join("model/model.safetensors")) == read(&dir.join("model/model.safetensors")));
}

#[test]
fn eval_subcommand_reproduces_the_final_evaluation() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("run.toml");
    std::fs::write(
        &config,
        "seed = 5\n[model]\nhidden = 16\nlayers = 1\n[data]\npairs = 30\neval_pairs = 6\n[sft]\nsteps = 2\nbatch_size = 4\n\
         [preference]\nsteps = 2\nbatch_size = 2\n[eval]\ngenerations = 2\nmax_new_tokens = 4\n",
    )
    .expect("write");
    let dir = tmp.path().join("run");
    let trained = String::from_utf8(finish(&mut train(&config, &dir, false, None)).stdout).expect("utf8");
    let out = finish(trainer().arg("eval").arg("--model").arg(dir.join("model")).arg("--config").arg(&config));
    let evaluated = String::from_utf8(out.stdout).expect("utf8");
    // Every metric but the drift (which needs the start of the run) is printed identically.
    let lines = |s: &str| -> Vec<String> { s.lines().filter(|l| !l.contains("drift")).map(str::to_owned).collect() };
    assert_eq!(lines(&evaluated), lines(&trained));
    assert!(evaluated.contains("eval/preference_accuracy = "), "{evaluated}");
}
