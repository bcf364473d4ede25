//! The tokenizer against transformers 5.24's `CLIPTokenizer` on the fixtures, and its file errors.

use std::path::PathBuf;

use std::str::FromStr;

use serde_json::{json, Value};
use tokenizers::Tokenizer;

use super::*;
use crate::hub::LocalDir;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[derive(Deserialize)]
struct Reference {
    prompts: Vec<String>,
    truncated_words: Vec<String>,
}

/// `prompts`, `truncated_words` and the `tokens.ids` / `tokens.mask` rows transformers
/// computed for pipeline `tiny`.
fn reference(tiny: &str) -> (Reference, Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let dir = fixtures().join(tiny);
    let meta: Reference = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let rows = |key: &str| -> Vec<Vec<u32>> {
        let t = st.tensor(key).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::I64, "{key}");
        assert_eq!(t.shape(), [meta.prompts.len(), 77], "{key}");
        let values: Vec<u32> = t
            .data()
            .chunks_exact(8)
            .map(|b| {
                let v = i64::from_le_bytes(b.try_into().unwrap());
                u32::try_from(v).unwrap()
            })
            .collect();
        values.chunks(77).map(<[u32]>::to_vec).collect()
    };
    let (ids, mask) = (rows("tokens.ids"), rows("tokens.mask"));
    (meta, ids, mask)
}

/// A temporary model folder and its empty `tokenizer/` folder.
fn tokenizer_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let tok_dir = dir.path().join("tokenizer");
    std::fs::create_dir(&tok_dir).unwrap();
    (dir, tok_dir)
}

fn load(dir: impl Into<PathBuf>) -> Result<ClipTokenizer> {
    ClipTokenizer::load(&LocalDir::new(dir), "tokenizer")
}

fn model_error(err: &anyhow::Error) -> &ModelError {
    err.downcast_ref::<ModelError>()
        .unwrap_or_else(|| panic!("expected a ModelError, got: {err:#}"))
}

/// tiny-a's `tokenizer/` holds tokenizer.json, tiny-b's only vocab.json + merges.txt; both
/// must give transformers' ids and masks, and diffusers' truncation warning text.
#[test]
fn matches_transformers_for_both_layouts() {
    for tiny in ["tiny-a", "tiny-b"] {
        let tok = load(fixtures().join(tiny).join("prior")).unwrap();
        assert_eq!(tok.max_len(), 77);
        let (meta, ids, mask) = reference(tiny);
        assert_eq!(meta.truncated_words.len(), 1);
        let long = meta.prompts.len() - 1; // make_fixtures.py: the last prompt is truncated
        for (i, prompt) in meta.prompts.iter().enumerate() {
            let got = tok.encode(prompt).unwrap();
            assert_eq!(got.ids, ids[i], "{tiny} ids of prompt {i} {prompt:?}");
            assert_eq!(got.attention_mask, mask[i], "{tiny} mask of prompt {i} {prompt:?}");
            if i == long {
                // Exact: the fixture is diffusers' own `batch_decode(untruncated[:, 76:-1])`,
                // and the decode is the same `tokenizers` ByteLevel decoder + transformers'
                // "</w>" -> " " and strip(). ("word28" is the BPE tokens "2</w>" "8</w>", so
                // the text reads "2 8 word 2 9 ...".)
                assert_eq!(got.dropped.as_deref(), Some(meta.truncated_words[0].as_str()));
                assert_eq!(got.ids[76], 49407, "EOS kept at the end");
                assert!(got.attention_mask.iter().all(|&m| m == 1));
            } else {
                assert_eq!(got.dropped, None, "{tiny} prompt {i} {prompt:?}");
            }
        }
    }
}

/// A prompt of exactly 75 content tokens fills all 77 slots without dropping anything
/// (diffusers compares the untruncated ids, equal here); one more token is dropped.
#[test]
fn exact_fit_is_not_truncated() {
    let tok = load(fixtures().join("tiny-a/prior")).unwrap();
    let words = |n: usize| vec!["cat"; n].join(" ");
    let fit = tok.encode(&words(75)).unwrap();
    assert_eq!(fit.dropped, None);
    assert_eq!(fit.ids[0], 49406);
    assert_eq!(fit.ids[76], 49407);
    assert!(fit.ids[1..76].iter().all(|&id| id == fit.ids[1] && id != 49407));
    assert!(fit.attention_mask.iter().all(|&m| m == 1));
    let over = tok.encode(&format!("{} dogs", words(75))).unwrap();
    assert_eq!(over.ids, fit.ids);
    assert_eq!(over.dropped.as_deref(), Some("dogs"));
}

/// `clip_tokenizer_json` writes the same tokenizer.json that transformers saved for the
/// fixture (same JSON value), and it tokenizes the same.
#[test]
fn clip_tokenizer_json_matches_fixture() {
    let bpe = fixtures().join("tokenizer-bpe");
    let ours = clip_tokenizer_json(
        &std::fs::read_to_string(bpe.join("vocab.json")).unwrap(),
        &std::fs::read_to_string(bpe.join("merges.txt")).unwrap(),
    )
    .unwrap();
    let theirs = std::fs::read_to_string(fixtures().join("tokenizer-json/tokenizer.json")).unwrap();
    let value = |s: &str| serde_json::from_str::<Value>(s).unwrap();
    assert!(
        value(&ours) == value(&theirs),
        "tokenizer.json differs from the fixture"
    );

    let ours = Tokenizer::from_str(&ours).unwrap();
    let theirs = Tokenizer::from_str(&theirs).unwrap();
    let (meta, _, _) = reference("tiny-a");
    let extra = [
        "A  B\tC\nD",
        "<|endoftext|> x <|startoftext|>",
        "ÀÉÎ ǅ ﬁ 2³ ½",
        "\u{1c}x\u{a0}y",
    ];
    for text in meta.prompts.iter().map(String::as_str).chain(extra) {
        let a = ours.encode(text, true).unwrap();
        let b = theirs.encode(text, true).unwrap();
        assert_eq!(a.get_ids(), b.get_ids(), "{text:?}");
        assert!(a.get_ids().len() > 2 || text.is_empty(), "{text:?}");
    }
}

/// Config resolution as transformers 5 does it, checked against
/// `CLIPTokenizer.from_pretrained(d)(text, padding="max_length", max_length=12,
/// truncation=True)` on this folder (transformers 5.24): an `added_tokens_decoder` with
/// `normalized: true` makes the special tokens match after lowercasing, `pad_token` "!" pads
/// with id 0, and `model_max_length` 1e30 means "unset" (77 here).
#[test]
fn config_overrides_as_transformers() {
    let (dir, tok_dir) = tokenizer_dir();
    std::fs::copy(
        fixtures().join("tokenizer-json/tokenizer.json"),
        tok_dir.join("tokenizer.json"),
    )
    .unwrap();
    let special = |content: &str| {
        json!({"content": content, "lstrip": false, "normalized": true, "rstrip": false,
               "single_word": false, "special": true})
    };
    let config = format!(
        r#"{{"added_tokens_decoder": {{"49406": {}, "49407": {}}},
            "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>", "pad_token": "!",
            "model_max_length": 1000000000000000019884624838656}}"#,
        special("<|startoftext|>"),
        special("<|endoftext|>")
    );
    std::fs::write(tok_dir.join("tokenizer_config.json"), config).unwrap();
    // Ignored by transformers when the config has an added_tokens_decoder.
    std::fs::write(tok_dir.join("special_tokens_map.json"), r#"{"pad_token": "?"}"#).unwrap();

    let tok = load(dir.path()).unwrap();
    assert_eq!(tok.max_len(), 77);
    for (text, head) in [
        ("a <|ENDOFTEXT|> b", [49406, 320, 49407, 321, 49407]),
        ("x<|endoftext|>y", [49406, 343, 49407, 344, 49407]),
    ] {
        let got = tok.encode(text).unwrap();
        let mut ids = head.to_vec();
        ids.resize(77, 0);
        let mut mask = vec![1; 5];
        mask.resize(77, 0);
        assert_eq!(got.ids, ids, "{text:?}");
        assert_eq!(got.attention_mask, mask, "{text:?}");
    }

    // Without the added_tokens_decoder, special_tokens_map.json wins over the config and the
    // tokens come from tokenizer.json (normalized: false: "<|ENDOFTEXT|>" is plain text).
    std::fs::write(
        tok_dir.join("tokenizer_config.json"),
        r#"{"pad_token": "?", "model_max_length": 12}"#,
    )
    .unwrap();
    std::fs::write(
        tok_dir.join("special_tokens_map.json"),
        r#"{"pad_token": {"content": "!"}}"#,
    )
    .unwrap();
    let tok = load(dir.path()).unwrap();
    assert_eq!(tok.max_len(), 12);
    let got = tok.encode("a <|ENDOFTEXT|> b").unwrap();
    assert_eq!(got.ids, [49406, 320, 27, 347, 40786, 4160, 91, 285, 321, 49407, 0, 0]);
    assert_eq!(got.attention_mask, [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0]);
}

#[test]
fn missing_tokenizer_is_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = load(dir.path()).unwrap_err();
    match model_error(&err) {
        ModelError::MissingFile { component, path } => {
            assert_eq!(component, "tokenizer");
            let path = path.display().to_string();
            assert!(path.contains("tokenizer/tokenizer.json"), "{path}");
            assert!(path.contains("tokenizer/merges.txt"), "{path}");
        }
        other => panic!("expected MissingFile, got {other}"),
    }

    // vocab.json without merges.txt names merges.txt.
    let tok_dir = dir.path().join("tokenizer");
    std::fs::create_dir(&tok_dir).unwrap();
    std::fs::write(tok_dir.join("vocab.json"), "{}").unwrap();
    let err = load(dir.path()).unwrap_err();
    match model_error(&err) {
        ModelError::MissingFile { component, path } => {
            assert_eq!(component, "tokenizer");
            assert!(path.ends_with("tokenizer/merges.txt"), "{}", path.display());
        }
        other => panic!("expected MissingFile, got {other}"),
    }
}

fn assert_bad_file(dir: &Path, file: &str) {
    let err = load(dir).unwrap_err();
    match model_error(&err) {
        ModelError::BadFile { component, path, .. } => {
            assert_eq!(component, "tokenizer");
            assert_eq!(path, &dir.join("tokenizer").join(file), "{err:#}");
        }
        other => panic!("expected BadFile for {file}, got {other}"),
    }
}

#[test]
fn corrupt_files_are_bad_file() {
    let (dir, tok_dir) = tokenizer_dir();

    // tokenizer.json: cut in half; then valid JSON but not a tokenizer.
    let full = std::fs::read_to_string(fixtures().join("tokenizer-json/tokenizer.json")).unwrap();
    std::fs::write(tok_dir.join("tokenizer.json"), &full[..full.len() / 2]).unwrap();
    assert_bad_file(dir.path(), "tokenizer.json");
    std::fs::write(tok_dir.join("tokenizer.json"), r#"{"model": {"type": "BPE"}}"#).unwrap();
    assert_bad_file(dir.path(), "tokenizer.json");
    // A merge whose tokens are not in the vocabulary.
    std::fs::write(
        tok_dir.join("tokenizer.json"),
        r#"{"model": {"type": "BPE", "vocab": {"<|startoftext|>": 0, "<|endoftext|>": 1},
            "merges": [["a", "b"]]}}"#,
    )
    .unwrap();
    assert_bad_file(dir.path(), "tokenizer.json");
    std::fs::remove_file(tok_dir.join("tokenizer.json")).unwrap();

    // vocab.json + merges.txt: a bad merges line, then a bad vocab.
    let bpe = fixtures().join("tokenizer-bpe");
    std::fs::copy(bpe.join("vocab.json"), tok_dir.join("vocab.json")).unwrap();
    std::fs::write(tok_dir.join("merges.txt"), "#version: 0.2\ni n\nt h e\n").unwrap();
    assert_bad_file(dir.path(), "merges.txt");
    std::fs::copy(bpe.join("merges.txt"), tok_dir.join("merges.txt")).unwrap();
    std::fs::write(tok_dir.join("vocab.json"), r#"{"a": "zero"}"#).unwrap();
    assert_bad_file(dir.path(), "vocab.json");
    std::fs::copy(bpe.join("vocab.json"), tok_dir.join("vocab.json")).unwrap();
    assert!(load(dir.path()).is_ok());

    // tokenizer_config.json: not JSON; a pad token outside the vocabulary; a bad length.
    for config in ["{", r#"{"pad_token": "<pad>"}"#, r#"{"model_max_length": 1}"#] {
        std::fs::write(tok_dir.join("tokenizer_config.json"), config).unwrap();
        assert_bad_file(dir.path(), "tokenizer_config.json");
    }
}

/// A `tokenizer.json` from `tokenizers` < 0.20, with the merges as `"a b"` strings, gives
/// the same tokens.
#[test]
fn legacy_merges_tokenize_the_same() {
    let (dir, tok_dir) = tokenizer_dir();
    let fixture = std::fs::read_to_string(fixtures().join("tokenizer-json/tokenizer.json")).unwrap();
    let mut json: Value = serde_json::from_str(&fixture).unwrap();
    let joined = |m: &Value| Value::from(format!("{} {}", m[0].as_str().unwrap(), m[1].as_str().unwrap()));
    let merges = json["model"]["merges"].as_array().unwrap().iter().map(joined).collect();
    json["model"]["merges"] = Value::Array(merges);
    std::fs::write(tok_dir.join("tokenizer.json"), json.to_string()).unwrap();

    let tok = load(dir.path()).unwrap();
    let (meta, ids, _) = reference("tiny-a");
    for (prompt, ids) in meta.prompts.iter().zip(&ids) {
        assert_eq!(&tok.encode(prompt).unwrap().ids, ids, "{prompt:?}");
    }
}

#[test]
fn python_strip() {
    assert_eq!(py_strip(" \u{1c}a b\u{1f}\u{3000}\n"), "a b");
    assert_eq!(py_strip("\u{200b}a"), "\u{200b}a"); // zero-width space: not whitespace
}
