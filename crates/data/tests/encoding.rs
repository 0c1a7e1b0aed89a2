//! Chat templates, tokenizer special-token rules, the exact prompt/completion boundary and
//! truncation.

mod common;

use slime_data::{
    BuiltinTemplate, ChatTemplate, EncodeStats, Encoded, Message, PairEncoder, PreferenceExample, RowProblem,
    TextTokenizer, Truncation, TruncationMode, collate_pairs,
};

fn conv(system: Option<&str>, user: &str) -> Vec<Message> {
    system.map(|s| Message::new("system", s)).into_iter().chain([Message::new("user", user)]).collect()
}

#[test]
fn builtin_templates_render_what_transformers_renders() {
    let llama = ChatTemplate::builtin(BuiltinTemplate::Llama3, "<|begin_of_text|>", "<|eot_id|>").unwrap();
    assert_eq!(
        llama.render(&conv(Some("Be brief."), "Hi"), true).unwrap(),
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    let gemma = ChatTemplate::builtin(BuiltinTemplate::Gemma, "<bos>", "<eos>").unwrap();
    let mut messages = conv(Some("Be brief."), "Hi");
    messages.push(Message::new("assistant", "Yo"));
    assert_eq!(
        gemma.render(&messages, false).unwrap(),
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nYo<end_of_turn>\n"
    );
    assert_eq!(
        gemma.render(&conv(None, "Hi"), true).unwrap(),
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    );
    let chatml = ChatTemplate::builtin(BuiltinTemplate::Chatml, "", "<|im_end|>").unwrap();
    assert_eq!(
        chatml.render(&conv(None, "Hi"), true).unwrap(),
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}

/// A Zephyr-style Hugging Face template: expression lines keep their newlines, block tags
/// lose theirs (trim_blocks) and their indentation (lstrip_blocks).
const ZEPHYR: &str = "{% for message in messages %}\n    {% if message['role'] == 'user' %}\n{{ '<|user|>\\n' + message['content'] + eos_token }}\n    {% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\\n'  + message['content'].strip() + eos_token }}\n    {% else %}\n{{ raise_exception('unknown role ' + message['role']) }}\n    {% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}";

#[test]
fn hugging_face_templates_follow_jinja2_whitespace_rules_and_python_methods() {
    let t = ChatTemplate::new("zephyr", ZEPHYR, "<bos>", "</s>").unwrap();
    assert_eq!(t.render(&conv(None, "Hi"), true).unwrap(), "<|user|>\nHi</s>\n<|assistant|>\n");
    let mut m = conv(None, "Hi");
    m.push(Message::new("assistant", "  Yo  "));
    assert_eq!(t.render(&m, false).unwrap(), "<|user|>\nHi</s>\n<|assistant|>\nYo</s>\n");
    let err = t.render(&[Message::new("tool", "x")], false).unwrap_err().to_string();
    assert!(err.contains("zephyr") && err.contains("unknown role tool"), "{err}");
    let err = ChatTemplate::new("broken", "{% for m in messages %}", "", "").unwrap_err().to_string();
    assert!(err.contains("broken"), "{err}");
}

#[test]
fn tokenizer_config_supplies_specials_bos_rule_and_template() {
    let config = serde_json::json!({
        "bos_token": {"content": "<bos>", "special": true},
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "add_bos_token": true,
        "chat_template": [
            {"name": "tool_use", "template": "unused"},
            {"name": "default", "template": slime_data::BuiltinTemplate::Gemma.source()}
        ]
    });
    let tok = TextTokenizer::from_parts(common::bpe(), "fixture", &config).unwrap();
    let bos = tok.token_id("<bos>").unwrap();
    assert_eq!(tok.specials().bos, Some(("<bos>".into(), bos)));
    assert_eq!(tok.specials().pad_id, tok.token_id("<pad>").unwrap());
    assert!(tok.specials().add_bos);
    let template = tok.chat_template(None).unwrap();
    // The Gemma trap: the template writes <bos> and the tokenizer adds it; exactly one results.
    let encoder = PairEncoder::new(tok, Some(template), Truncation::default()).unwrap();
    let ex = PreferenceExample::Chat {
        prompt: conv(None, "Hi"),
        chosen: Message::new("assistant", "Yo"),
        rejected: Message::new("assistant", "No"),
    };
    let Encoded::Pair { pair, .. } = encoder.encode(0, &ex).unwrap() else { panic!("skipped") };
    assert_eq!(pair.prompt[0], bos);
    assert_eq!(pair.prompt.iter().filter(|&&t| t == bos).count(), 1);

    let bad = serde_json::json!({"bos_token": "<s>"});
    let err = TextTokenizer::from_parts(common::bpe(), "fixture", &bad).unwrap_err().to_string();
    assert!(err.contains("bos_token `<s>`") && err.contains("not in the vocabulary"), "{err}");
}

#[test]
fn a_tokenizer_without_the_templates_special_tokens_is_rejected() {
    let plain = slime_data::fixtures::train_byte_level_bpe(&["hello there".to_string()], 300, &["<eos>"]).unwrap();
    let tok = TextTokenizer::from_parts(plain, "plain.json", &serde_json::json!({"eos_token": "<eos>"})).unwrap();
    let err = tok.chat_template(Some(BuiltinTemplate::Llama3)).unwrap_err().to_string();
    assert!(err.contains("plain.json") && err.contains("<|start_header_id|>"), "{err}");
    let err = tok.chat_template(None).unwrap_err().to_string();
    assert!(err.contains("no chat_template"), "{err}");
}

/// The completion-masked tokens of the chosen row, decoded.
fn masked_text(encoder: &PairEncoder, pair: &slime_data::TokenizedPair) -> String {
    let batch = collate_pairs(&[pair], 0);
    let row: Vec<u32> =
        (0..batch.seq_len).filter(|&t| batch.completion_mask[t] == 1).map(|t| batch.input_ids[t]).collect();
    encoder.tokenizer().decode(&row, false).expect("decode")
}

#[test]
fn chat_completion_mask_covers_exactly_the_response_and_end_of_turn() {
    for (builtin, bos, eot, prefix) in [
        (
            BuiltinTemplate::Llama3,
            "<|begin_of_text|>",
            "<|eot_id|>",
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
        (BuiltinTemplate::Gemma, "<bos>", "<end_of_turn>", "<start_of_turn>model\n"),
        (BuiltinTemplate::Chatml, "<bos>", "<|im_end|>", "<|im_start|>assistant\n"),
    ] {
        let tok = common::tokenizer(bos, "<eos>", false);
        let template = tok.chat_template(Some(builtin)).unwrap();
        let encoder = PairEncoder::new(tok, Some(template), Truncation::default()).unwrap();
        let ex = PreferenceExample::Chat {
            prompt: conv(Some("kalo mi."), "Hello world, hello there!"),
            chosen: Message::new("assistant", "Paris is the capital of France."),
            rejected: Message::new("assistant", "The answer is 42."),
        };
        let Encoded::Pair { pair, .. } = encoder.encode(5, &ex).unwrap() else { panic!("skipped") };
        assert_eq!(masked_text(&encoder, &pair), format!("Paris is the capital of France.{eot}"), "{builtin:?}");
        let prompt_text = encoder.tokenizer().decode(&pair.prompt, false).unwrap();
        assert!(prompt_text.ends_with(prefix), "{builtin:?}: {prompt_text:?}");
        assert!(!prompt_text.contains("Paris"));
    }
}

#[test]
fn boundary_is_exact_where_a_joint_tokenization_would_merge_across_it() {
    let tok = common::tokenizer("<bos>", "<eos>", true);
    let eos = tok.token_id("<eos>").unwrap();
    let joint = tok.encode("The answer is 42").unwrap();
    let encoder = PairEncoder::new(tok, None, Truncation::default()).unwrap();
    // Implicit prompt: the shared prefix "The answer is " ends in a space that a joint
    // tokenization merges into " 42".
    let ex = PreferenceExample::Text { prompt: "The answer is ".into(), chosen: "42".into(), rejected: "7".into() };
    let Encoded::Pair { pair, .. } = encoder.encode(0, &ex).unwrap() else { panic!("skipped") };
    let t = encoder.tokenizer();
    let separate: Vec<u32> = pair.prompt[1..].iter().chain(&pair.chosen[..pair.chosen.len() - 1]).copied().collect();
    assert_ne!(joint, separate, "the fixture must merge across the boundary for this test to mean anything");
    assert_eq!(pair.prompt, [vec![t.token_id("<bos>").unwrap()], t.encode("The answer is ").unwrap()].concat());
    assert_eq!(pair.chosen, [t.encode("42").unwrap(), vec![eos]].concat());
    assert_eq!(masked_text(&encoder, &pair), "42<eos>");
}

#[test]
fn truncation_follows_trl_and_is_counted() {
    let tok = common::tokenizer("<bos>", "<eos>", true);
    let long_prompt = "kalo mi ne ru ta shi po ve dan tor el is an or ex qu um ber sta pre con".to_string();
    let ex = PreferenceExample::Text {
        prompt: long_prompt.clone(),
        chosen: "ka lo mi ne ru ta".into(),
        rejected: "po".into(),
    };
    let full = PairEncoder::new(common::tokenizer("<bos>", "<eos>", true), None, Truncation::default()).unwrap();
    let Encoded::Pair { pair: whole, .. } = full.encode(0, &ex).unwrap() else { panic!() };
    assert!(whole.prompt.len() > 10 && whole.chosen.len() > 6 && whole.rejected.len() <= 6);

    let keep_end = Truncation { max_length: Some(14), max_prompt_length: Some(8), mode: TruncationMode::KeepEnd };
    let encoder = PairEncoder::new(tok, None, keep_end).unwrap();
    let out = encoder.encode(0, &ex).unwrap();
    let Encoded::Pair { pair, prompt_truncated: true, completion_truncated: true } = &out else { panic!("{out:?}") };
    assert_eq!(pair.prompt[0], whole.prompt[0], "BOS kept");
    assert_eq!(pair.prompt[1..], whole.prompt[whole.prompt.len() - 7..]);
    assert_eq!(pair.chosen, whole.chosen[..6]);
    assert_eq!(pair.rejected, whole.rejected, "short completion untouched");
    let mut stats = EncodeStats::default();
    stats.record(&out);

    let keep_start = Truncation { max_length: None, max_prompt_length: Some(8), mode: TruncationMode::KeepStart };
    let encoder = PairEncoder::new(common::tokenizer("<bos>", "<eos>", true), None, keep_start).unwrap();
    let Encoded::Pair { pair, .. } = encoder.encode(0, &ex).unwrap() else { panic!() };
    assert_eq!(pair.prompt, whole.prompt[..8]);

    // A prompt filling max_length is cut to leave one completion token; nothing is empty.
    let tight = Truncation { max_length: Some(3), max_prompt_length: None, mode: TruncationMode::KeepEnd };
    let encoder = PairEncoder::new(common::tokenizer("<bos>", "<eos>", true), None, tight).unwrap();
    let out = encoder.encode(1, &ex).unwrap();
    let Encoded::Pair { pair, .. } = &out else { panic!("{out:?}") };
    assert_eq!((pair.prompt.len(), pair.chosen.len(), pair.rejected.len()), (2, 1, 1));
    stats.record(&out);
    stats.record(&Encoded::Skipped(RowProblem::EmptyAfterTruncation));
    assert_eq!(
        (stats.pairs, stats.truncated_pairs, stats.truncated_prompts, stats.truncated_completions),
        (2, 2, 2, 2)
    );
    assert_eq!(stats.skipped.get(&RowProblem::EmptyAfterTruncation), Some(&1));

    let bad = Truncation { max_length: Some(8), max_prompt_length: Some(8), mode: TruncationMode::KeepEnd };
    let err = PairEncoder::new(common::tokenizer("<bos>", "<eos>", true), None, bad).unwrap_err().to_string();
    assert!(err.contains("max_prompt_length"), "{err}");
}

#[test]
fn chat_data_without_a_template_is_an_error() {
    let encoder = PairEncoder::new(common::tokenizer("<bos>", "<eos>", true), None, Truncation::default()).unwrap();
    let ex = PreferenceExample::Chat {
        prompt: conv(None, "Hi"),
        chosen: Message::new("assistant", "a"),
        rejected: Message::new("assistant", "b"),
    };
    let err = encoder.encode(0, &ex).unwrap_err().to_string();
    assert!(err.contains("chat template"), "{err}");
}
