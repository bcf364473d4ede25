//! The CLIP tokenizer, as diffusers 0.42.1 calls it through transformers 5.24.
//!
//! diffusers' Würstchen pipelines load `CLIPTokenizer.from_pretrained(repo, subfolder="tokenizer")`
//! (in transformers 5 that is the `tokenizers`-backed class, the old `CLIPTokenizerFast`) and call
//! it twice per prompt (`pipeline_wuerstchen_prior.py`, `encode_prompt`):
//!
//! ```text
//! tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
//! untruncated_ids = tokenizer(prompt, padding="longest").input_ids
//! # if untruncated_ids is longer: warn with batch_decode(untruncated_ids[:, model_max_length - 1 : -1])
//! ```
//!
//! How transformers 5 builds that tokenizer matters for which parts of the files count:
//! `CLIPTokenizer.__init__` always builds the pipeline itself (NFC, `\s+` -> " ", lowercase;
//! CLIP's split regex + byte-level; BPE with `</w>` word ends; RobertaProcessing with BOS/EOS)
//! and takes from `tokenizer.json` only the vocabulary, the merges and the added tokens, from
//! `vocab.json` + `merges.txt` the same two tables. [`ClipTokenizer::load`] does the same: it
//! extracts vocab and merges from whichever files exist and builds the tokenizer from one
//! template ([`clip_tokenizer_json`] writes it out), so both layouts give the same tokens, and a
//! `tokenizer.json` written by an older `tokenizers` with another normalizer or pre-tokenizer
//! still tokenizes the way transformers 5 does.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{anyhow, ensure, Result};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection, TruncationParams,
    TruncationStrategy,
};

use crate::error::ModelError;
use crate::hub::FileSource;

/// The BPE model's word-end marker (`CLIPTokenizer.__init__`: `end_of_word_suffix="</w>"`).
const END_OF_WORD_SUFFIX: &str = "</w>";

/// CLIP's pre-tokenizer split pattern, verbatim from transformers' `tokenization_clip.py`.
const CLIP_SPLIT_REGEX: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// `CLIPTokenizer.__init__` defaults, used when neither `tokenizer_config.json` nor
/// `special_tokens_map.json` names the token.
const DEFAULT_BOS: &str = "<|startoftext|>";
const DEFAULT_EOS: &str = "<|endoftext|>";
const DEFAULT_UNK: &str = "<|endoftext|>";
const DEFAULT_PAD: &str = "<|endoftext|>";

/// CLIP's context length: the text encoders' `max_position_embeddings` in every Würstchen repo.
/// Used when `tokenizer_config.json` has no `model_max_length` or transformers' "unset" value.
const DEFAULT_MAX_LEN: usize = 77;

/// Above this, `model_max_length` is transformers' "no limit" marker (it writes `int(1e30)`),
/// not a length; nothing CLIP-like comes near it.
const MAX_SANE_MAX_LEN: f64 = 65_536.0;

/// One prompt, tokenized as diffusers' first tokenizer call returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    /// BOS, at most `max_len - 2` BPE tokens, EOS, then the pad token: exactly `max_len` ids.
    pub ids: Vec<u32>,
    /// 1 for BOS, the content and EOS, 0 for padding: exactly `max_len` entries.
    pub attention_mask: Vec<u32>,
    /// When the prompt did not fit: the text that was cut off, as diffusers' warning shows it
    /// (`batch_decode(untruncated_ids[max_len - 1 : -1])`). `None` when nothing was cut.
    pub dropped: Option<String>,
}

/// A CLIP tokenizer with `CLIPTokenizer` semantics (see the module docs).
pub struct ClipTokenizer {
    /// Truncation and padding to `max_len`: diffusers' `padding="max_length", truncation=True`.
    padded: Tokenizer,
    /// Neither: diffusers' `padding="longest"` call on a single prompt.
    untruncated: Tokenizer,
    max_len: usize,
    pad_id: u32,
}

impl fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.untruncated.get_vocab_size(true))
            .field("max_len", &self.max_len)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl ClipTokenizer {
    /// Load the tokenizer in folder `component` (`"tokenizer"` in diffusers' layout) of `src`:
    /// `tokenizer.json` if present, else `vocab.json` + `merges.txt`; `tokenizer_config.json`
    /// and `special_tokens_map.json` (both optional) name the special tokens and the length.
    pub fn load(src: &dyn FileSource, component: &str) -> Result<Self> {
        let rel = |name: &str| format!("{component}/{name}");
        let bad = |path: &Path, message: String| ModelError::BadFile {
            component: component.to_string(),
            path: path.to_path_buf(),
            message,
        };

        let config = match src.get(&rel("tokenizer_config.json"))? {
            Some(path) => {
                let map = read_json_object(&path).map_err(|m| bad(&path, m))?;
                Some((path, map))
            }
            None => None,
        };
        let special_map = match src.get(&rel("special_tokens_map.json"))? {
            Some(path) => {
                let map = read_json_object(&path).map_err(|m| bad(&path, m))?;
                Some((path, map))
            }
            None => None,
        };

        let (tables, file_added, source_path) = match src.get(&rel("tokenizer.json"))? {
            Some(path) => {
                let text = read_text(&path).map_err(|m| bad(&path, m))?;
                let (tables, added) = tables_from_tokenizer_json(&text).map_err(|m| bad(&path, m))?;
                (tables, added, path)
            }
            None => {
                let vocab_path = src.get(&rel("vocab.json"))?;
                let merges_path = src.get(&rel("merges.txt"))?;
                let (vocab_path, merges_path) = match (&vocab_path, &merges_path) {
                    (Some(v), Some(m)) => (v.clone(), m.clone()),
                    (None, None) => {
                        return Err(ModelError::MissingFile {
                            component: component.to_string(),
                            path: PathBuf::from(format!(
                                "{} (nor {} + {})",
                                Path::new(&src.describe()).join(rel("tokenizer.json")).display(),
                                rel("vocab.json"),
                                rel("merges.txt"),
                            )),
                        }
                        .into())
                    }
                    (Some(_), None) | (None, Some(_)) => {
                        let which = if merges_path.is_none() {
                            "merges.txt"
                        } else {
                            "vocab.json"
                        };
                        return Err(ModelError::MissingFile {
                            component: component.to_string(),
                            path: Path::new(&src.describe()).join(rel(which)),
                        }
                        .into());
                    }
                };
                let vocab_text = read_text(&vocab_path).map_err(|m| bad(&vocab_path, m))?;
                let merges_text = read_text(&merges_path).map_err(|m| bad(&merges_path, m))?;
                let vocab = parse_vocab_json(&vocab_text).map_err(|m| bad(&vocab_path, m))?;
                let merges = parse_merges_txt(&merges_text).map_err(|m| bad(&merges_path, m))?;
                (BpeTables { vocab, merges }, Vec::new(), vocab_path)
            }
        };

        let settings = resolve_settings(
            config.as_ref().map(|(_, m)| m),
            special_map.as_ref().map(|(_, m)| m),
            file_added,
        )
        .map_err(|m| bad(config.as_ref().map_or(&source_path, |(p, _)| p), m))?;
        // A named token outside the vocabulary: blame the file that names the tokens.
        if let Err(m) = check_named_tokens(&tables, &settings) {
            let names = config.as_ref().or(special_map.as_ref()).map(|(p, _)| p);
            let message = format!("{m} of {}", source_path.display());
            return Err(bad(names.unwrap_or(&source_path), message).into());
        }
        let json = build_tokenizer_json(&tables, &settings).map_err(|m| bad(&source_path, m))?;
        let untruncated = Tokenizer::from_str(&json)
            .map_err(|e| bad(&source_path, format!("cannot build the CLIP tokenizer: {e}")))?;
        let pad_id = untruncated.token_to_id(&settings.pad).ok_or_else(|| {
            bad(
                &source_path,
                format!("pad token {:?} is not in the vocabulary", settings.pad),
            )
        })?;

        let mut padded = untruncated.clone();
        // What `set_truncation_and_padding` enables for padding="max_length", truncation=True.
        padded
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: settings.max_len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| bad(&source_path, format!("cannot set truncation: {e}")))?;
        padded.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(settings.max_len),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: settings.pad.clone(),
        }));

        tracing::debug!(
            source = %src.describe(),
            file = %source_path.display(),
            max_len = settings.max_len,
            pad_id,
            "loaded the {component} CLIP tokenizer"
        );
        Ok(Self {
            padded,
            untruncated,
            max_len: settings.max_len,
            pad_id,
        })
    }

    /// `model_max_length`: the number of ids [`ClipTokenizer::encode`] returns.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Tokenize one prompt the way diffusers' `encode_prompt` does (see the module docs).
    pub fn encode(&self, text: &str) -> Result<Tokens> {
        let enc = self
            .padded
            .encode(text, true)
            .map_err(|e| anyhow!("cannot tokenize {text:?}: {e}"))?;
        let ids = enc.get_ids().to_vec();
        let attention_mask = enc.get_attention_mask().to_vec();
        ensure!(
            ids.len() == self.max_len && attention_mask.len() == self.max_len,
            "tokenizing {text:?} gave {} ids, not {}",
            ids.len(),
            self.max_len
        );

        // diffusers warns when `untruncated_ids` is at least as long and differs; for one prompt
        // (no batch padding) that is exactly "longer than max_len".
        let full = self
            .untruncated
            .encode(text, true)
            .map_err(|e| anyhow!("cannot tokenize {text:?}: {e}"))?;
        let full = full.get_ids();
        let dropped = if full.len() > self.max_len {
            Some(self.decode_text(&full[self.max_len - 1..full.len() - 1])?)
        } else {
            None
        };
        Ok(Tokens {
            ids,
            attention_mask,
            dropped,
        })
    }

    /// `CLIPTokenizer.decode(ids)`: byte-level decode (special tokens kept), every `</w>` turned
    /// into a space, then Python's `str.strip()`.
    fn decode_text(&self, ids: &[u32]) -> Result<String> {
        let text = self
            .untruncated
            .decode(ids, false)
            .map_err(|e| anyhow!("cannot decode {ids:?}: {e}"))?;
        Ok(py_strip(&text.replace(END_OF_WORD_SUFFIX, " ")).to_string())
    }
}

/// The `tokenizer.json` that transformers 5's `CLIPTokenizer` builds from the slow tokenizer's
/// files: `vocab.json` (token -> id) and `merges.txt` (a `#version` line, then `a b` per line),
/// with the default special tokens (`<|startoftext|>`, `<|endoftext|>`) as added tokens. The
/// same JSON structure as the Hub's CLIP `tokenizer.json` files; `truncation` and `padding` null.
pub fn clip_tokenizer_json(vocab_json: &str, merges_txt: &str) -> Result<String> {
    let vocab = parse_vocab_json(vocab_json).map_err(|m| anyhow!("vocab.json: {m}"))?;
    let merges = parse_merges_txt(merges_txt).map_err(|m| anyhow!("merges.txt: {m}"))?;
    let settings = resolve_settings(None, None, Vec::new()).map_err(|m| anyhow!(m))?;
    build_tokenizer_json(&BpeTables { vocab, merges }, &settings).map_err(|m| anyhow!(m))
}

// ------------------------------------------------------------------------------------------
// Files
// ------------------------------------------------------------------------------------------

fn read_text(path: &Path) -> std::result::Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))
}

fn read_json_object(path: &Path) -> std::result::Result<Map<String, Value>, String> {
    let text = read_text(path)?;
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err("expected a JSON object".to_string()),
        Err(e) => Err(format!("invalid JSON: {e}")),
    }
}

/// The two tables a BPE model needs; the rest of the tokenizer is fixed by `CLIPTokenizer`.
struct BpeTables {
    /// Sorted by id, as `tokenizers` writes `tokenizer.json`.
    vocab: Vec<(String, u32)>,
    merges: Vec<(String, String)>,
}

/// `vocab.json`: a JSON object token -> id.
fn parse_vocab_json(text: &str) -> std::result::Result<Vec<(String, u32)>, String> {
    let map: BTreeMap<String, u32> = serde_json::from_str(text).map_err(|e| format!("expected {{token: id}}: {e}"))?;
    Ok(sorted_vocab(map))
}

fn sorted_vocab(map: BTreeMap<String, u32>) -> Vec<(String, u32)> {
    let mut vocab: Vec<(String, u32)> = map.into_iter().collect();
    vocab.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
    vocab
}

/// `merges.txt` as `tokenizers`' `BPE::read_file` reads it (what transformers 5 hands the file
/// to): every line starting with `#version` skipped, every other line exactly `a b`.
fn parse_merges_txt(text: &str) -> std::result::Result<Vec<(String, String)>, String> {
    let mut merges = Vec::new();
    for (rank, line) in text.lines().filter(|l| !l.starts_with("#version")).enumerate() {
        match line.split(' ').collect::<Vec<_>>().as_slice() {
            [a, b] => merges.push((a.to_string(), b.to_string())),
            _ => {
                return Err(format!(
                    "merge {} is {line:?}, expected two tokens separated by one space",
                    rank + 1
                ))
            }
        }
    }
    Ok(merges)
}

#[derive(Deserialize)]
struct TokenizerJsonFile {
    model: TokenizerJsonModel,
    #[serde(default)]
    added_tokens: Vec<TokenizerJsonAddedToken>,
}

#[derive(Deserialize)]
struct TokenizerJsonModel {
    #[serde(rename = "type")]
    kind: Option<String>,
    vocab: BTreeMap<String, u32>,
    merges: Vec<Merge>,
}

/// `tokenizers` >= 0.20 writes merges as pairs, older versions as `"a b"` strings.
#[derive(Deserialize)]
#[serde(untagged)]
enum Merge {
    Pair(String, String),
    Joined(String),
}

#[derive(Deserialize)]
struct TokenizerJsonAddedToken {
    id: u32,
    content: String,
    #[serde(default)]
    single_word: bool,
    #[serde(default)]
    lstrip: bool,
    #[serde(default)]
    rstrip: bool,
    #[serde(default = "default_true")]
    normalized: bool,
    #[serde(default)]
    special: bool,
}

fn default_true() -> bool {
    true
}

/// Vocab, merges and added tokens of a `tokenizer.json` (transformers 5's
/// `convert_to_native_format` keeps exactly these for a class with its own `__init__`).
fn tables_from_tokenizer_json(text: &str) -> std::result::Result<(BpeTables, Vec<(u32, AddedTokenSpec)>), String> {
    let file: TokenizerJsonFile = serde_json::from_str(text).map_err(|e| format!("not a BPE tokenizer.json: {e}"))?;
    if let Some(kind) = file.model.kind.as_deref() {
        if kind != "BPE" {
            return Err(format!("model type is {kind:?}, CLIP needs \"BPE\""));
        }
    }
    let mut merges = Vec::with_capacity(file.model.merges.len());
    for (rank, merge) in file.model.merges.into_iter().enumerate() {
        match merge {
            Merge::Pair(a, b) => merges.push((a, b)),
            Merge::Joined(s) => match s.split(' ').collect::<Vec<_>>().as_slice() {
                [a, b] => merges.push((a.to_string(), b.to_string())),
                _ => return Err(format!("merge {} is {s:?}, expected \"a b\"", rank + 1)),
            },
        }
    }
    let added = file
        .added_tokens
        .into_iter()
        .map(|t| {
            let spec = AddedTokenSpec {
                content: t.content,
                single_word: t.single_word,
                lstrip: t.lstrip,
                rstrip: t.rstrip,
                normalized: t.normalized,
                special: t.special,
            };
            (t.id, spec)
        })
        .collect();
    Ok((
        BpeTables {
            vocab: sorted_vocab(file.model.vocab),
            merges,
        },
        added,
    ))
}

// ------------------------------------------------------------------------------------------
// Special tokens and length, resolved as transformers 5's `from_pretrained` resolves them
// ------------------------------------------------------------------------------------------

/// An `AddedToken` as `tokenizers` stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AddedTokenSpec {
    content: String,
    single_word: bool,
    lstrip: bool,
    rstrip: bool,
    normalized: bool,
    special: bool,
}

impl AddedTokenSpec {
    /// `AddedToken(content, special=True)`: transformers' form for a named special token given
    /// as a plain string (`normalized` defaults to `not special`).
    fn special(content: &str) -> Self {
        Self {
            content: content.to_string(),
            single_word: false,
            lstrip: false,
            rstrip: false,
            normalized: false,
            special: true,
        }
    }

    /// An `AddedToken(**dict)` from a config file; `special` as the caller forces it or the dict
    /// says (default false), `normalized` defaulting to `not special` like `AddedToken`'s.
    fn from_dict(map: &Map<String, Value>, force_special: Option<bool>) -> std::result::Result<Self, String> {
        let flag = |key: &str| -> std::result::Result<Option<bool>, String> {
            match map.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Bool(b)) => Ok(Some(*b)),
                Some(other) => Err(format!("`{key}` is {other}, expected true or false")),
            }
        };
        let content = match map.get("content") {
            Some(Value::String(s)) => s.clone(),
            _ => {
                return Err(format!(
                    "added token {} has no string `content`",
                    Value::Object(map.clone())
                ))
            }
        };
        let special = match force_special {
            Some(s) => s,
            None => flag("special")?.unwrap_or(false),
        };
        Ok(Self {
            content,
            single_word: flag("single_word")?.unwrap_or(false),
            lstrip: flag("lstrip")?.unwrap_or(false),
            rstrip: flag("rstrip")?.unwrap_or(false),
            normalized: flag("normalized")?.unwrap_or(!special),
            special,
        })
    }
}

/// A named special token's value in `tokenizer_config.json` / `special_tokens_map.json`: a
/// string, an `AddedToken` dict, or null/absent.
fn named_token(
    value: Option<&Value>,
    key: &str,
    force_special: Option<bool>,
) -> std::result::Result<Option<AddedTokenSpec>, String> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(AddedTokenSpec::special(s))),
        Some(Value::Object(map)) => AddedTokenSpec::from_dict(map, force_special)
            .map(Some)
            .map_err(|m| format!("`{key}`: {m}")),
        Some(other) => Err(format!("`{key}` is {other}, expected a string or an object")),
    }
}

/// Everything besides vocab and merges that shapes the tokenizer.
#[derive(Debug)]
struct Settings {
    bos: String,
    eos: String,
    unk: String,
    pad: String,
    /// In the order transformers adds them: `added_tokens_decoder` by id, then the named
    /// special tokens it lacks.
    added: Vec<AddedTokenSpec>,
    max_len: usize,
}

/// The named special tokens transformers knows about, in `SPECIAL_TOKENS_ATTRIBUTES` order
/// (CLIP has no sep/cls/mask), with `CLIPTokenizer.__init__`'s defaults.
const NAMED_TOKENS: [(&str, &str); 4] = [
    ("bos_token", DEFAULT_BOS),
    ("eos_token", DEFAULT_EOS),
    ("unk_token", DEFAULT_UNK),
    ("pad_token", DEFAULT_PAD),
];

/// transformers 5 (`PreTrainedTokenizerBase._from_pretrained`, `TokenizersBackend.__init__`):
/// with an `added_tokens_decoder` in `tokenizer_config.json`, that table is the added tokens and
/// `special_tokens_map.json` is ignored; without one, `special_tokens_map.json` overrides the
/// config's named tokens and `tokenizer.json`'s `added_tokens` are the table. Named special
/// tokens missing from the table are added after it, as special tokens.
fn resolve_settings(
    config: Option<&Map<String, Value>>,
    special_map: Option<&Map<String, Value>>,
    file_added: Vec<(u32, AddedTokenSpec)>,
) -> std::result::Result<Settings, String> {
    let empty = Map::new();
    let config = config.unwrap_or(&empty);

    let mut table: Vec<(u32, AddedTokenSpec)> = match config.get("added_tokens_decoder") {
        Some(Value::Object(decoder)) => {
            let mut table = Vec::with_capacity(decoder.len());
            for (id, token) in decoder {
                let id: u32 = id
                    .parse()
                    .map_err(|_| format!("added_tokens_decoder key {id:?} is not an id"))?;
                let spec = match token {
                    Value::Object(map) => AddedTokenSpec::from_dict(map, None)?,
                    other => return Err(format!("added_tokens_decoder[{id}] is {other}, expected an object")),
                };
                table.push((id, spec));
            }
            table
        }
        Some(Value::Null) | None => file_added,
        Some(other) => return Err(format!("`added_tokens_decoder` is {other}, expected an object")),
    };
    table.sort_by_key(|(id, _)| *id);
    let use_special_map = !matches!(config.get("added_tokens_decoder"), Some(Value::Object(_)));

    let mut added: Vec<AddedTokenSpec> = table.into_iter().map(|(_, spec)| spec).collect();
    let mut names = Vec::with_capacity(NAMED_TOKENS.len());
    for (key, default) in NAMED_TOKENS {
        let from_map = special_map.filter(|_| use_special_map).and_then(|m| m.get(key));
        let spec = match from_map {
            // `special_tokens_map.json` dicts become `AddedToken(**value, special=True)`.
            Some(v) if !v.is_null() => named_token(Some(v), key, Some(true))?,
            _ => named_token(config.get(key), key, None)?,
        };
        let spec = match spec {
            // A named token that the table already has is that table entry.
            Some(spec) => added
                .iter()
                .find(|t| t.content == spec.content)
                .cloned()
                .unwrap_or(AddedTokenSpec { special: true, ..spec }),
            None => AddedTokenSpec::special(default),
        };
        names.push(spec.content.clone());
        if !added.iter().any(|t| t.content == spec.content) {
            added.push(spec);
        }
    }
    let [bos, eos, unk, pad]: [String; 4] = names
        .try_into()
        .map_err(|_| "internal error: four named tokens expected".to_string())?;

    Ok(Settings {
        bos,
        eos,
        unk,
        pad,
        added,
        max_len: model_max_length(config.get("model_max_length"))?,
    })
}

/// `model_max_length` from `tokenizer_config.json`: absent, null or transformers' "unset"
/// value `int(1e30)` -> CLIP's 77 (diffusers would otherwise pad to 1e30).
fn model_max_length(value: Option<&Value>) -> std::result::Result<usize, String> {
    let n = match value {
        None | Some(Value::Null) => return Ok(DEFAULT_MAX_LEN),
        Some(Value::Number(n)) => n.as_f64().unwrap_or(f64::INFINITY),
        Some(other) => return Err(format!("`model_max_length` is {other}, expected a number")),
    };
    if n > MAX_SANE_MAX_LEN {
        tracing::debug!(model_max_length = n, "model_max_length unset; using {DEFAULT_MAX_LEN}");
        return Ok(DEFAULT_MAX_LEN);
    }
    if n.fract() != 0.0 || n < 2.0 {
        return Err(format!(
            "`model_max_length` is {n}, expected a whole number of at least 2 (BOS and EOS)"
        ));
    }
    Ok(n as usize)
}

// ------------------------------------------------------------------------------------------
// The tokenizer.json template (transformers 5's `CLIPTokenizer.__init__`)
// ------------------------------------------------------------------------------------------

/// A vocabulary serialized as a JSON object in id order.
struct OrderedVocab<'a>(&'a [(String, u32)]);

impl Serialize for OrderedVocab<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (token, id) in self.0 {
            map.serialize_entry(token, id)?;
        }
        map.end()
    }
}

#[derive(Serialize)]
struct TokenizerJsonOut<'a> {
    version: &'static str,
    truncation: Option<()>,
    padding: Option<()>,
    added_tokens: Vec<AddedTokenOut<'a>>,
    normalizer: Value,
    pre_tokenizer: Value,
    post_processor: Value,
    decoder: Value,
    model: BpeOut<'a>,
}

#[derive(Serialize)]
struct AddedTokenOut<'a> {
    id: u32,
    content: &'a str,
    single_word: bool,
    lstrip: bool,
    rstrip: bool,
    normalized: bool,
    special: bool,
}

#[derive(Serialize)]
struct BpeOut<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    dropout: Option<f32>,
    unk_token: &'a str,
    continuing_subword_prefix: &'static str,
    end_of_word_suffix: &'static str,
    fuse_unk: bool,
    byte_fallback: bool,
    ignore_merges: bool,
    vocab: OrderedVocab<'a>,
    merges: &'a [(String, String)],
}

/// BOS, EOS, UNK and PAD must be in the vocabulary (transformers would append a missing one
/// as a new token, one the text encoder's embedding table does not have).
fn check_named_tokens(tables: &BpeTables, settings: &Settings) -> std::result::Result<(), String> {
    for (what, token) in [
        ("bos token", &settings.bos),
        ("eos token", &settings.eos),
        ("unk token", &settings.unk),
        ("pad token", &settings.pad),
    ] {
        if !tables.vocab.iter().any(|(t, _)| t == token) {
            return Err(format!("{what} {token:?} is not in the vocabulary"));
        }
    }
    Ok(())
}

fn build_tokenizer_json(tables: &BpeTables, settings: &Settings) -> std::result::Result<String, String> {
    let mut ids: BTreeMap<&str, u32> = BTreeMap::new();
    for (token, id) in &tables.vocab {
        ids.insert(token, *id);
    }
    let id_of = |token: &str, what: &str| {
        ids.get(token)
            .copied()
            .ok_or_else(|| format!("{what} {token:?} is not in the vocabulary"))
    };

    let mut seen = HashSet::new();
    let mut added = Vec::with_capacity(settings.added.len());
    for t in &settings.added {
        if !seen.insert(t.content.as_str()) {
            continue;
        }
        added.push(AddedTokenOut {
            id: id_of(&t.content, "added token")?,
            content: &t.content,
            single_word: t.single_word,
            lstrip: t.lstrip,
            rstrip: t.rstrip,
            normalized: t.normalized,
            special: t.special,
        });
    }
    id_of(&settings.unk, "unk token")?;
    id_of(&settings.pad, "pad token")?;

    let out = TokenizerJsonOut {
        version: "1.0",
        truncation: None,
        padding: None,
        added_tokens: added,
        normalizer: json!({
            "type": "Sequence",
            "normalizers": [
                {"type": "NFC"},
                {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
                {"type": "Lowercase"},
            ],
        }),
        pre_tokenizer: json!({
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": CLIP_SPLIT_REGEX},
                    "behavior": "Removed",
                    "invert": true,
                },
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            ],
        }),
        post_processor: json!({
            "type": "RobertaProcessing",
            "sep": [settings.eos, id_of(&settings.eos, "eos token")?],
            "cls": [settings.bos, id_of(&settings.bos, "bos token")?],
            "trim_offsets": false,
            "add_prefix_space": false,
        }),
        // `decoders.ByteLevel()` with its defaults.
        decoder: json!({
            "type": "ByteLevel",
            "add_prefix_space": true,
            "trim_offsets": true,
            "use_regex": true,
        }),
        model: BpeOut {
            kind: "BPE",
            dropout: None,
            unk_token: &settings.unk,
            continuing_subword_prefix: "",
            end_of_word_suffix: END_OF_WORD_SUFFIX,
            fuse_unk: false,
            byte_fallback: false,
            ignore_merges: false,
            vocab: OrderedVocab(&tables.vocab),
            merges: &tables.merges,
        },
    };
    serde_json::to_string(&out).map_err(|e| format!("cannot write tokenizer.json: {e}"))
}

/// Python's `str.strip()`: trims what `str.isspace()` accepts, which is Rust's White_Space plus
/// the four information separators U+001C..U+001F.
fn py_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

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
        let meta: Reference =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
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
        let dir = tempfile::tempdir().unwrap();
        let tok_dir = dir.path().join("tokenizer");
        std::fs::create_dir(&tok_dir).unwrap();
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
        let dir = tempfile::tempdir().unwrap();
        let tok_dir = dir.path().join("tokenizer");
        std::fs::create_dir(&tok_dir).unwrap();

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

    #[test]
    fn python_strip() {
        assert_eq!(py_strip(" \u{1c}a b\u{1f}\u{3000}\n"), "a b");
        assert_eq!(py_strip("\u{200b}a"), "\u{200b}a"); // zero-width space: not whitespace
    }
}
