//! Checks on the real models, tokenizers and templates that `cargo xtask assets` puts under
//! `assets/`. Each test runs when its assets are present and says so when they are not (CI has
//! no assets: the downloads are ~350 MB).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use slime_data::{BuiltinTemplate, Message, TextTokenizer};
use slime_models::CausalLm;

fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets")
}

/// The asset directory, or `None` after printing how to get it.
fn present(relative: &str) -> Option<PathBuf> {
    let dir = assets().join(relative);
    if dir.exists() {
        Some(dir)
    } else {
        println!("SKIPPED: {} is not present; run `cargo xtask assets` to check the real assets", dir.display());
        None
    }
}

/// A paragraph of plain English for the loss check.
const PARAGRAPH: &str = "The history of the city begins with a small settlement on the banks of the river. \
Over the centuries, merchants built houses and markets along the water, and the town grew into an \
important centre of trade. Today it is known for its old bridges, its museums and its lively squares, \
where people meet in the evening to talk, eat and listen to music.";

/// Mean next-token loss of `text` (BOS first when the family uses one).
fn mean_loss(lm: &CausalLm, tok: &TextTokenizer, text: &str) -> f64 {
    let ids = tok.with_bos(tok.encode(text).expect("encode"));
    let n = ids.len();
    let input = Tensor::from_vec(ids, (1, n), &Device::Cpu).expect("ids tensor");
    let logps: Vec<f32> = lm
        .model()
        .token_logps(&input, None, 64)
        .and_then(|t| Ok(t.flatten_all()?.to_vec1()?))
        .expect("token log-probs");
    -logps[1..].iter().map(|&l| f64::from(l)).sum::<f64>() / (n - 1) as f64
}

fn greedy(lm: &CausalLm, tok: &TextTokenizer, prompt: &str, n: usize) -> String {
    let ids = tok.with_bos(tok.encode(prompt).expect("encode"));
    let out = lm.model().generate_greedy(&ids, n, &[]).expect("greedy generation");
    tok.decode(&out, true).expect("decode")
}

#[test]
fn smollm2_completes_a_fact_and_has_the_expected_loss() {
    let Some(dir) = present("models/smollm2-135m-instruct") else { return };
    let lm = CausalLm::from_dir(&dir, &Device::Cpu).unwrap();
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    let completion = greedy(&lm, &tok, "The capital of France is", 3);
    println!("SmolLM2: `The capital of France is` -> `{completion}`");
    assert!(completion.trim_start().starts_with("Paris"), "{completion:?}");
    let loss = mean_loss(&lm, &tok, PARAGRAPH);
    println!("SmolLM2 mean token loss on the paragraph: {loss:.3}");
    assert!((2.5..4.0).contains(&loss), "{loss}");
}

#[test]
fn smollm2_tokenizer_and_chatml_template() {
    let Some(dir) = present("models/smollm2-135m-instruct") else { return };
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    assert_eq!(tok.vocab_size(), 49_152);
    assert_eq!(tok.token_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_id("<|im_end|>"), Some(2));
    assert_eq!(tok.decode(&tok.encode("Hello world 2024!").unwrap(), false).unwrap(), "Hello world 2024!");
    // SmolLM2 splits digits one by one.
    assert_eq!(tok.encode("2024").unwrap().len(), 4);
    let template = tok.chat_template(Some(BuiltinTemplate::Chatml)).unwrap();
    let text = template.render(&[Message::new("user", "Hi")], true).unwrap();
    assert!(text.ends_with("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"), "{text:?}");
}

#[test]
fn gemma3_completes_a_fact_and_has_the_expected_loss() {
    let Some(dir) = present("models/gemma-3-270m") else { return };
    let lm = CausalLm::from_dir(&dir, &Device::Cpu).unwrap();
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    let loss = mean_loss(&lm, &tok, PARAGRAPH);
    println!("Gemma-3-270M mean token loss on the paragraph: {loss:.3}");
    // The 270M base model answers "The capital of France is" with " the capital of the country
    // of France." (measured); the reverse question is answered.
    let completion = greedy(&lm, &tok, "Paris is the capital and largest city of", 4);
    println!("Gemma-3-270M: `Paris is the capital and largest city of` -> `{completion}`");
    assert!((2.0..3.6).contains(&loss), "{loss}");
    assert!(completion.trim_start().starts_with("France"), "{completion:?}");
}

#[test]
fn llama3_tokenizer_ids_and_template() {
    let Some(dir) = present("tokenizers/llama3") else { return };
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    assert_eq!(tok.encode("Hello").unwrap(), [9906]);
    assert_eq!(tok.token_id("<|eot_id|>"), Some(128_009));
    assert_eq!(tok.token_id("<|begin_of_text|>"), Some(128_000));
    let template = tok.chat_template(None).unwrap();
    let messages = [Message::new("system", "Be brief."), Message::new("user", "Hi")];
    assert_eq!(
        template.render(&messages, true).unwrap(),
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    );
}

#[test]
fn gemma3_tokenizer_ids_and_template() {
    let Some(dir) = present("tokenizers/gemma3") else { return };
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    assert_eq!(tok.token_id("<bos>"), Some(2));
    assert_eq!(tok.token_id("<end_of_turn>"), Some(106));
    assert!(tok.specials().add_bos);
    let template = tok.chat_template(None).unwrap();
    let messages = [Message::new("user", "Hi"), Message::new("assistant", "Hello!")];
    assert_eq!(
        template.render(&messages, false).unwrap(),
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
    );
}
