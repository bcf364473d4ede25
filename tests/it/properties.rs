//! Property tests: no input reachable from a user or a file panics, and what comes out is
//! right for every input. Prompts-file parsing, the tokenizer, config files (parsed,
//! validated, and the network they describe built and run), size rules, request validation
//! and the `--shard`, `--device`, `--dtype` and `--rng` specs, on arbitrary input.
//!
//! CI runs proptest's default 256 cases per property; for a longer run:
//! `PROPTEST_CASES=20000 cargo test --release --test it properties::`.

use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use proptest::prelude::*;
use wuerstchen::config::{
    level, BlockKind, ClipTextConfig, DecoderConfig, LevelBlocks, PriorConfig, SchedulerConfig, VqganConfig,
};
use wuerstchen::error::ModelError;
use wuerstchen::models::{PaellaVqDecoder, WuerstchenDiffNeXt, WuerstchenPrior};
use wuerstchen::pipeline::SizeRule;
use wuerstchen::prompts::{PromptLine, Shard};
use wuerstchen::request::{generate_request, DeviceSpec, GenerateRequest, SamplingInput, DEFAULT_DECODER_STEPS};
use wuerstchen::rng::BoxMuller;
use wuerstchen::scheduler::{default_prior_timesteps, linear_timesteps};
use wuerstchen::tokenizer::ClipTokenizer;

fn tokenizer() -> &'static ClipTokenizer {
    static T: OnceLock<ClipTokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let src = wuerstchen::hub::LocalDir::new(crate::common::fixtures().join("tiny-a/prior"));
        ClipTokenizer::load(&src, "tokenizer").unwrap()
    })
}

/// A JSON value of any kind, to throw at config parsers.
fn any_json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(Into::into),
        any::<i64>().prop_map(Into::into),
        (-1e6f64..1e6).prop_map(Into::into),
        (0u64..70).prop_map(Into::into),
        "[a-zA-Z_]{0,6}".prop_map(Into::into),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| prop::collection::vec(inner, 0..5).prop_map(Into::into))
}

const CONFIG_KEYS: &[&str] = &[
    "c_in",
    "c",
    "c_cond",
    "c_r",
    "depth",
    "nhead",
    "c_out",
    "patch_size",
    "c_hidden",
    "blocks",
    "level_config",
    "inject_effnet",
    "effnet_embd",
    "clip_embd",
    "kernel_size",
    "levels",
    "bottleneck_blocks",
    "embed_dim",
    "latent_channels",
    "scale_factor",
    "up_down_scale_factor",
    "out_channels",
    "scaler",
    "s",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "layer_norm_eps",
    "vocab_size",
];

fn any_config_object() -> impl Strategy<Value = String> {
    prop::collection::btree_map(prop::sample::select(CONFIG_KEYS), any_json(), 0..8).prop_map(|m| {
        let obj: serde_json::Map<String, serde_json::Value> = m.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        serde_json::Value::Object(obj).to_string()
    })
}

/// Fresh variables for a network: whatever it asks for is created (zeros) and recorded.
fn var_builder() -> (VarMap, VarBuilder<'static>) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    (vm, vb)
}

/// splitmix64: deterministic, so a failing case replays with the same weights and inputs.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Uniform values in [-scale, scale) from `seed`, as an f32 tensor on the CPU.
fn seeded(shape: &[usize], scale: f32, seed: u64) -> Tensor {
    let mut state = seed;
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| ((splitmix(&mut state) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// `build` run twice on one VarMap: the first run records every variable (zeros), which then
/// get seeded random values scaled by 1/sqrt(fan-in); the second run loads those. Zero weights
/// would make every output a trivial function of the input.
fn with_random_weights<T>(seed: u64, build: impl Fn(VarBuilder<'static>) -> candle_core::Result<T>) -> T {
    let (vm, vb) = var_builder();
    build(vb.clone()).unwrap();
    let vars = vm.data().lock().unwrap();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for (i, name) in names.into_iter().enumerate() {
        let var = &vars[name];
        let dims = var.dims().to_vec();
        let fan_in: usize = dims.iter().skip(1).product::<usize>().max(1);
        let value = seeded(&dims, 1.0 / (fan_in as f32).sqrt(), seed ^ ((i as u64) << 32));
        var.set(&value).unwrap();
    }
    drop(vars);
    build(vb).unwrap()
}

fn all_finite(t: &Tensor) -> bool {
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    v.iter().all(|x| x.is_finite())
}

/// Equal as JSON, numbers compared by value (an integer 5 given for an f64 field comes back
/// as 5.0).
fn same_json(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y)),
        _ => a == b,
    }
}

/// A config file parses to the struct's defaults with exactly the keys it names replaced (keys
/// of other components are ignored), and the parsed struct round-trips through JSON. A file
/// that does not parse names one of the struct's own keys.
fn parses_as_defaults_with_overrides<T>(text: &str) -> Result<Option<T>, TestCaseError>
where
    T: serde::de::DeserializeOwned + serde::Serialize + Default + PartialEq + std::fmt::Debug,
{
    let input: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text).unwrap();
    let defaults = serde_json::to_value(T::default()).unwrap();
    let fields = defaults.as_object().unwrap();
    let own: Vec<&String> = input.keys().filter(|k| fields.contains_key(*k)).collect();
    let Ok(parsed) = serde_json::from_str::<T>(text) else {
        prop_assert!(!own.is_empty(), "a file with none of these keys parses: {}", text);
        return Ok(None);
    };
    let value = serde_json::to_value(&parsed).unwrap();
    for (key, default) in fields {
        let want = input.get(key).unwrap_or(default);
        prop_assert!(
            same_json(&value[key], want),
            "{}: {} != {} in {}",
            key,
            value[key],
            want,
            text
        );
    }
    let back: T = serde_json::from_value(value).unwrap();
    prop_assert!(back == parsed, "{:?} != {:?}", back, parsed);
    Ok(Some(parsed))
}

fn small_decoder_config() -> impl Strategy<Value = DecoderConfig> {
    (1usize..4).prop_flat_map(|levels| {
        (
            prop::collection::vec(1usize..9, levels),
            prop::collection::vec(-1i64..4, levels),
            prop::collection::vec(0usize..3, levels),
            prop::collection::vec("[CTA]{0,3}".prop_map(|s| level(&s)), levels),
            prop::collection::vec(any::<bool>(), levels),
            (
                1usize..5,
                1usize..5,
                1usize..9,
                prop::sample::select(vec![1usize, 3, 5]),
                1usize..3,
                4usize..9,
            ),
        )
            .prop_map(
                |(
                    c_hidden,
                    nhead,
                    blocks,
                    level_config,
                    inject_effnet,
                    (effnet_embd, clip_embd, c_cond, kernel_size, patch_size, c_r),
                )| {
                    DecoderConfig {
                        c_in: 4,
                        c_out: 4,
                        c_r,
                        patch_size,
                        c_cond,
                        c_hidden,
                        nhead,
                        blocks,
                        level_config,
                        inject_effnet,
                        effnet_embd,
                        clip_embd,
                        kernel_size,
                    }
                },
            )
    })
}

/// The non-blank lines of a prompts file as the format defines them: `\n`-separated, a `\r`
/// before the `\n` dropped, surrounding whitespace trimmed; `(1-based line, Some(text))`, or
/// `None` for a line that is not UTF-8.
fn non_blank_lines(bytes: &[u8]) -> Vec<(usize, Option<String>)> {
    let mut out = Vec::new();
    for (i, raw) in bytes.split(|b| *b == b'\n').enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        match std::str::from_utf8(raw) {
            Ok(t) if t.trim().is_empty() => {}
            Ok(t) => out.push((i + 1, Some(t.trim().to_string()))),
            Err(_) => out.push((i + 1, None)),
        }
    }
    out
}

/// A JSON line of only `prompt` (a string) and maybe `seed` (a u64), as the fields it sets.
fn simple_json_line(text: &str) -> Option<PromptLine> {
    let m: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text).ok()?;
    let seed = match m.get("seed") {
        None => None,
        Some(v) => Some(v.as_u64()?),
    };
    if m.len() != 1 + usize::from(seed.is_some()) {
        return None;
    }
    Some(PromptLine {
        prompt: m.get("prompt")?.as_str()?.to_string(),
        seed,
        ..Default::default()
    })
}

/// Lines of a prompts file: prompts, blanks, JSON lines good and bad, `\r` endings.
fn prompts_file_lines() -> impl Strategy<Value = String> {
    let line = prop_oneof![
        "[ a-z{}\":,\r\t]{0,12}",
        "\\PC{0,12}",
        "[a-z ]{0,8}".prop_map(|p| format!("{{\"prompt\": {}}}", serde_json::Value::from(p))),
        "[a-z ]{0,8}".prop_map(|p| format!("  {{\"prompt\": \"{p}\", \"seed\": 3}}\r")),
    ];
    (prop::collection::vec(line, 0..12), any::<bool>())
        .prop_map(|(lines, crlf)| lines.join(if crlf { "\r\n" } else { "\n" }))
}

/// What is wrong with a JSON line, if anything.
#[derive(Debug, Clone)]
enum LineFault {
    /// a key PromptLine does not have (a typo must not be ignored)
    UnknownKey(&'static str),
    /// a known key with a value of the wrong type
    WrongType(&'static str),
    /// no `prompt`
    NoPrompt,
}

/// A prompts-file JSON line's fields, with some of the optional ones set.
fn any_prompt_line() -> impl Strategy<Value = PromptLine> {
    // numbers as people type them (a few decimals): serde_json parses those exactly, while a
    // 17-digit value may come back one ulp off (serde_json without `float_roundtrip`)
    let decimal = |lo: i32, hi: i32, scale: f64| (lo..hi).prop_map(move |k| f64::from(k) / scale);
    let timesteps = prop_oneof![
        prop::collection::vec(decimal(-500, 1500, 1000.0), 0..5),
        // a valid schedule: distinct values in (0, 1], descending, then 0
        prop::collection::btree_set(1u32..=1000, 1..5).prop_map(|set| {
            let mut v: Vec<f64> = set.into_iter().rev().map(|k| f64::from(k) / 1000.0).collect();
            v.push(0.0);
            v
        }),
    ];
    (
        (
            ".{0,30}",
            proptest::option::of(".{0,12}"),
            proptest::option::of(any::<u64>()),
        ),
        (
            proptest::option::of(0usize..3000),
            proptest::option::of(0usize..3000),
            proptest::option::of(0usize..4),
        ),
        (
            proptest::option::of(0usize..6),
            proptest::option::of(timesteps),
            proptest::option::of(decimal(-2000, 2000, 100.0)),
        ),
        (
            proptest::option::of(0usize..6),
            proptest::option::of(decimal(-2000, 2000, 100.0)),
            proptest::option::of("[a-z{}]{0,8}\\.png"),
        ),
    )
        .prop_map(
            |(
                (prompt, negative_prompt, seed),
                (width, height, num_images),
                (prior_steps, prior_timesteps, prior_guidance),
                (decoder_steps, decoder_guidance, output),
            )| PromptLine {
                prompt,
                negative_prompt,
                seed,
                width,
                height,
                prior_steps,
                prior_timesteps,
                prior_guidance,
                decoder_steps,
                decoder_guidance,
                num_images,
                output,
            },
        )
}

const PROMPT_LINE_KEYS: &[&str] = &[
    "prompt",
    "negative_prompt",
    "seed",
    "width",
    "height",
    "prior_steps",
    "steps",
    "prior_timesteps",
    "prior_guidance",
    "guidance",
    "decoder_steps",
    "decoder_guidance",
    "num_images",
    "output",
];

fn any_line_fault() -> impl Strategy<Value = Option<LineFault>> {
    proptest::option::of(prop_oneof![
        prop::sample::select(CONFIG_KEYS).prop_map(LineFault::UnknownKey),
        prop::sample::select(PROMPT_LINE_KEYS).prop_map(LineFault::WrongType),
        Just(LineFault::NoPrompt),
    ])
}

/// `fields` as a JSON object (unset options left out; the alias keys `steps` and `guidance`
/// where `aliases`), then spoilt by `fault`.
fn json_line(fields: &PromptLine, aliases: bool, fault: Option<&LineFault>) -> String {
    use serde_json::{json, Value};
    let mut m = serde_json::Map::new();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            m.insert(k.to_string(), v);
        }
    };
    put("prompt", Some(json!(fields.prompt)));
    put("negative_prompt", fields.negative_prompt.as_ref().map(|v| json!(v)));
    put("seed", fields.seed.map(|v| json!(v)));
    put("width", fields.width.map(|v| json!(v)));
    put("height", fields.height.map(|v| json!(v)));
    put(
        if aliases { "steps" } else { "prior_steps" },
        fields.prior_steps.map(|v| json!(v)),
    );
    put("prior_timesteps", fields.prior_timesteps.as_ref().map(|v| json!(v)));
    put(
        if aliases { "guidance" } else { "prior_guidance" },
        fields.prior_guidance.map(|v| json!(v)),
    );
    put("decoder_steps", fields.decoder_steps.map(|v| json!(v)));
    put("decoder_guidance", fields.decoder_guidance.map(|v| json!(v)));
    put("num_images", fields.num_images.map(|v| json!(v)));
    put("output", fields.output.as_ref().map(|v| json!(v)));
    match fault {
        None => {}
        Some(LineFault::UnknownKey(k)) => {
            m.insert(k.to_string(), json!(1));
        }
        Some(LineFault::WrongType(k)) => {
            // one spelling of the field only: drop the other before setting this one
            let spellings: &[&str] = match *k {
                "steps" | "prior_steps" => &["steps", "prior_steps"],
                "guidance" | "prior_guidance" => &["guidance", "prior_guidance"],
                _ => &[],
            };
            for spelling in spellings {
                m.remove(*spelling);
            }
            let wrong = match *k {
                "prompt" | "negative_prompt" | "output" => json!(5),
                _ => json!("five"),
            };
            m.insert(k.to_string(), wrong);
        }
        Some(LineFault::NoPrompt) => {
            m.remove("prompt");
        }
    }
    Value::Object(m).to_string()
}

/// The flags whose values `generate_request` must reject in `s` (empty: it must accept).
fn sampling_faults(s: &SamplingInput) -> Vec<&'static str> {
    fn schedule_ok(steps: Option<usize>, list: Option<&[f64]>) -> bool {
        match (steps, list) {
            (Some(_), Some(_)) | (Some(0), None) => false,
            (None, Some(l)) => {
                l.len() >= 2
                    && l.iter().all(|v| (0.0..=1.0).contains(v))
                    && l.windows(2).all(|w| w[1] < w[0])
                    && l[0] > 0.0
            }
            _ => true,
        }
    }
    let mut out = Vec::new();
    if s.width == 0 {
        out.push("--width");
    }
    if s.height == 0 {
        out.push("--height");
    }
    if s.num_images == 0 {
        out.push("--num-images");
    }
    if !schedule_ok(s.prior_steps, s.prior_timesteps.as_deref()) {
        out.push("--prior-");
    }
    if !s.prior_guidance.is_finite() {
        out.push("--prior-guidance");
    }
    if !schedule_ok(s.decoder_steps, s.decoder_timesteps.as_deref()) {
        out.push("--decoder-");
    }
    if !s.decoder_guidance.is_finite() {
        out.push("--decoder-guidance");
    }
    out
}

/// The request `s` describes: every field as given, schedules from the step count, the list
/// or the default.
fn expected_request(prompt: &str, negative_prompt: &str, s: &SamplingInput, seed: u64) -> GenerateRequest {
    let schedule = |steps: Option<usize>, list: &Option<Vec<f64>>, default: fn() -> Vec<f32>| match (steps, list) {
        (Some(n), _) => linear_timesteps(n),
        (None, Some(l)) => l.iter().map(|v| *v as f32).collect(),
        (None, None) => default(),
    };
    GenerateRequest {
        prompt: prompt.to_string(),
        negative_prompt: negative_prompt.to_string(),
        width: s.width,
        height: s.height,
        prior_timesteps: schedule(s.prior_steps, &s.prior_timesteps, default_prior_timesteps),
        prior_schedule_defaulted: s.prior_steps.is_none() && s.prior_timesteps.is_none(),
        prior_guidance: s.prior_guidance,
        decoder_timesteps: schedule(s.decoder_steps, &s.decoder_timesteps, || {
            linear_timesteps(DEFAULT_DECODER_STEPS)
        }),
        decoder_guidance: s.decoder_guidance,
        num_images: s.num_images,
        seed,
    }
}

/// Accepted sampling options give exactly the request they describe; rejected ones an error
/// that names a flag whose value is wrong (after `prefix`, e.g. `file:line: `).
fn check_request(
    got: Result<&GenerateRequest, String>,
    prefix: &str,
    want: GenerateRequest,
    faults: &[&str],
) -> Result<(), TestCaseError> {
    match got {
        Ok(r) => {
            prop_assert!(faults.is_empty(), "accepted despite {:?}: {:?}", faults, r);
            prop_assert_eq!(r, &want);
        }
        Err(msg) => {
            prop_assert!(!faults.is_empty(), "rejected valid input: {}", msg);
            prop_assert!(msg.starts_with(prefix), "{:?} does not start with {:?}", msg, prefix);
            prop_assert!(
                faults.iter().any(|f| msg.contains(f)),
                "{:?} names none of {:?}",
                msg,
                faults
            );
        }
    }
    Ok(())
}

/// Specs as typed: anything, or near misses of the real ones.
fn any_spec() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,12}",
        "[ \t]?(cpu|CPU|Cpu|cuda|CUDA|gpu|cuda:[+0-9]{1,3}|cuda:|f32|FP32|float32|f16|fp16|half|bf16|BFloat16|f64|cpu-scalar|cpu_scalar|[0-9]{1,2}/[0-9]{1,2}|[0-9]/|/[0-9])[ \t]?",
    ]
}

/// The rules each config's `validate` enforces, written out: what a model builder relies on.
fn prior_config_ok(c: &PriorConfig) -> bool {
    c.c_in > 0 && c.c > 0 && c.c_cond > 0 && c.depth > 0 && c.nhead > 0 && c.c % c.nhead == 0 && c.c_r >= 4
}

fn decoder_config_ok(c: &DecoderConfig) -> bool {
    let n = c.c_hidden.len();
    (1..=16).contains(&n)
        && [
            c.nhead.len(),
            c.blocks.len(),
            c.level_config.len(),
            c.inject_effnet.len(),
        ] == [n; 4]
        && c.c_in > 0
        && c.c_out > 0
        && c.c_cond > 0
        && (1..=1 << 16).contains(&c.patch_size)
        && c.kernel_size % 2 == 1
        && c.c_r >= 4
        && (0..n).all(|i| {
            let attention = c.level_blocks(i).contains(&BlockKind::Attn);
            let heads_ok = !attention || (c.nhead[i] > 0 && c.c_hidden[i] % c.nhead[i] as usize == 0);
            c.c_hidden[i] > 0 && heads_ok
        })
}

fn vqgan_config_ok(c: &VqganConfig) -> bool {
    (1..=16).contains(&c.levels)
        && (1..=1 << 16).contains(&c.up_down_scale_factor)
        && c.latent_channels > 0
        && c.out_channels == 3
        && c.embed_dim >> (c.levels - 1) > 0
        && c.scale_factor.is_finite()
}

fn scheduler_config_ok(c: &SchedulerConfig) -> bool {
    c.scaler.is_finite() && c.scaler > 0.0 && c.s.is_finite() && c.s >= 0.0
}

fn clip_config_ok(c: &ClipTextConfig) -> bool {
    c.hidden_size > 0
        && c.num_hidden_layers > 0
        && c.vocab_size > 0
        && c.num_attention_heads > 0
        && c.hidden_size % c.num_attention_heads == 0
        && c.max_position_embeddings > 0
        && c.layer_norm_eps.is_finite()
        && c.layer_norm_eps > 0.0
}

/// `validate` accepts exactly the configs the rules allow, and its error names the component.
fn check_validation(r: Result<(), ModelError>, ok: bool, name: &str) -> Result<bool, TestCaseError> {
    match r {
        Ok(()) => prop_assert!(ok, "{} accepted a config the rules reject", name),
        Err(e) => {
            prop_assert!(!ok, "{} rejected a valid config: {}", name, e);
            prop_assert!(e.to_string().starts_with(&format!("{name}: invalid config: ")), "{}", e);
            prop_assert!(
                matches!(&e, ModelError::BadConfig { component, .. } if component == name),
                "{:?}",
                e
            );
        }
    }
    Ok(ok)
}

proptest! {
    // about half the random decoder configs are invalid (nhead not dividing c_hidden): allow the rejects
    #![proptest_config(ProptestConfig { max_global_rejects: 1 << 20, ..ProptestConfig::default() })]

    #[test]
    fn prompts_files_give_each_non_blank_line_or_an_error_naming_it(
        bytes in prop::collection::vec(any::<u8>(), 0..400),
        text in ".{0,200}",
        file in prompts_file_lines(),
    ) {
        for input in [bytes.as_slice(), text.as_bytes(), file.as_bytes()] {
            let entries = wuerstchen::prompts::parse("f", input);
            let mut last = 0;
            for e in entries.iter().flatten() {
                prop_assert!(e.line > last);
                last = e.line;
            }
            // one result per non-blank line, in order, counted by `index`
            let lines = non_blank_lines(input);
            prop_assert_eq!(entries.len(), lines.len());
            for (index, (got, (line, text))) in entries.iter().zip(&lines).enumerate() {
                match (got, text) {
                    (Ok(e), Some(text)) => {
                        prop_assert_eq!((e.line, e.index), (*line, index));
                        if text.starts_with('{') {
                            let v: serde_json::Value = serde_json::from_str(text).unwrap();
                            prop_assert_eq!(Some(e.fields.prompt.as_str()), v["prompt"].as_str());
                            if let Some(fields) = simple_json_line(text) {
                                prop_assert_eq!(&e.fields, &fields);
                            }
                        } else {
                            let plain = PromptLine { prompt: text.clone(), ..Default::default() };
                            prop_assert_eq!(&e.fields, &plain);
                        }
                    }
                    (Err(err), text) => {
                        let msg = err.to_string();
                        prop_assert!(msg.starts_with(&format!("f:{line}: ")), "{}", msg);
                        match text {
                            None => prop_assert!(msg.contains("not valid UTF-8"), "{}", msg),
                            Some(t) => {
                                prop_assert!(t.starts_with('{') && msg.contains("invalid JSON line"), "{}", msg);
                                prop_assert!(simple_json_line(t).is_none(), "a good line rejected: {}", msg);
                            }
                        }
                    }
                    (Ok(e), None) => prop_assert!(false, "line {} is not UTF-8 but parsed: {:?}", line, e),
                }
            }
        }
    }

    #[test]
    fn json_prompt_lines_round_trip_into_jobs_or_name_line_and_field(
        fields in any_prompt_line(), aliases in any::<bool>(), fault in any_line_fault(),
        index in 0usize..1000, base_seed in any::<u64>(),
    ) {
        let line = json_line(&fields, aliases, fault.as_ref());
        // the line as the 3rd of a file, after a blank line and a plain prompt
        let file = format!("\n{}\n{line}\n", " ".repeat(index % 3) + "first");
        let entries = wuerstchen::prompts::parse("f", file.as_bytes());
        prop_assert_eq!(entries.len(), 2);
        let entry = match (&entries[1], &fault) {
            (Ok(e), None) => e,
            (Ok(e), Some(fault)) => return Err(TestCaseError::fail(format!("{fault:?} accepted: {line} -> {e:?}"))),
            (Err(e), None) => return Err(TestCaseError::fail(format!("{line} rejected: {e}"))),
            (Err(e), Some(fault)) => {
                let msg = e.to_string();
                prop_assert!(msg.starts_with("f:3: invalid JSON line: "), "{}", msg);
                match fault {
                    LineFault::UnknownKey(k) => prop_assert!(msg.contains(&format!("unknown field `{k}`")), "{}", msg),
                    LineFault::NoPrompt => prop_assert!(msg.contains("missing field `prompt`"), "{}", msg),
                    LineFault::WrongType(_) => prop_assert!(msg.contains("invalid type"), "{}", msg),
                }
                return Ok(());
            }
        };
        prop_assert_eq!((entry.line, entry.index), (3, 1));
        prop_assert_eq!(&entry.fields, &fields);
        // the job: the command line's options with the line's overrides
        let s = SamplingInput { width: 128, height: 128, prior_guidance: 4.0, num_images: 1, ..Default::default() };
        let entry = wuerstchen::prompts::Entry { index, ..entry.clone() };
        let job = wuerstchen::request::job_from_entry("f", &entry, &s, "base negative", base_seed);
        let merged = s.with_line(&fields);
        let seed = fields.seed.unwrap_or(base_seed.wrapping_add(index as u64));
        let negative = fields.negative_prompt.as_deref().unwrap_or("base negative");
        let want = expected_request(&fields.prompt, negative, &merged, seed);
        prop_assert_eq!((merged.width, merged.height), (fields.width.unwrap_or(128), fields.height.unwrap_or(128)));
        prop_assert_eq!(merged.num_images, fields.num_images.unwrap_or(1));
        prop_assert_eq!(merged.prior_guidance, fields.prior_guidance.unwrap_or(4.0));
        let faults = sampling_faults(&merged);
        if let Ok(job) = &job {
            prop_assert_eq!((job.index, job.origin.as_str(), &job.output), (index, "f:3", &fields.output));
        }
        check_request(job.as_ref().map(|j| &j.req).map_err(|e| e.to_string()), "f:3: ", want, &faults)?;
    }

    #[test]
    fn the_tokenizer_takes_any_text(text in "\\PC{0,300}") {
        let t = tokenizer().encode(&text).unwrap();
        prop_assert_eq!(t.ids.len(), 77);
        prop_assert_eq!(t.attention_mask.len(), 77);
        prop_assert_eq!(t.ids[0], 49406);
        let len = t.attention_mask.iter().take_while(|m| **m == 1).count();
        prop_assert!(t.attention_mask[len..].iter().all(|m| *m == 0));
        prop_assert_eq!(t.ids[len - 1], 49407);
    }

    #[test]
    fn config_files_parse_to_defaults_with_overrides_and_validate_or_name_the_component(text in any_config_object()) {
        if let Some(c) = parses_as_defaults_with_overrides::<PriorConfig>(&text)? {
            check_validation(c.validate(), prior_config_ok(&c), "prior")?;
        }
        if let Some(c) = parses_as_defaults_with_overrides::<DecoderConfig>(&text)? {
            if check_validation(c.validate(), decoder_config_ok(&c), "decoder")? {
                let n = c.levels();
                for i in 0..n {
                    // a level's blocks are written back as the letters they were read from
                    let letters = String::from(c.level_config[i].clone());
                    prop_assert_eq!(LevelBlocks::try_from(letters.clone()), Ok(c.level_config[i].clone()));
                    prop_assert_eq!(letters.chars().count(), c.level_blocks(i).len());
                }
                prop_assert_eq!(c.downscale(), c.patch_size << (n - 1));
            }
        }
        if let Some(c) = parses_as_defaults_with_overrides::<VqganConfig>(&text)? {
            if check_validation(c.validate(), vqgan_config_ok(&c), "vqgan")? {
                prop_assert_eq!(c.upscale(), c.up_down_scale_factor << (c.levels - 1));
                prop_assert!(c.c_levels().len() == c.levels && c.c_levels().iter().all(|v| *v > 0));
            }
        }
        if let Some(c) = parses_as_defaults_with_overrides::<SchedulerConfig>(&text)? {
            check_validation(c.validate(), scheduler_config_ok(&c), "scheduler")?;
        }
        if let Some(c) = parses_as_defaults_with_overrides::<ClipTextConfig>(&text)? {
            check_validation(c.validate("text_encoder"), clip_config_ok(&c), "text_encoder")?;
        }
    }

    #[test]
    fn any_valid_decoder_config_builds_and_runs(
        cfg in small_decoder_config(), h in 1usize..40, w in 1usize..40, kh in 1usize..4, kw in 1usize..4, seed in any::<u64>(),
    ) {
        prop_assume!(decoder_config_ok(&cfg));
        prop_assert!(cfg.validate().is_ok());
        let net = with_random_weights(seed, |vb| WuerstchenDiffNeXt::new(&cfg, vb));
        let effnet = seeded(&[1, cfg.effnet_embd, 3, 2], 1.0, seed ^ 1);
        let clip = seeded(&[1, 5, cfg.clip_embd], 1.0, seed ^ 2);
        let r = Tensor::new(&[0.5f32], &Device::Cpu).unwrap();
        // a latent whose sides divide by the decoder's downscale runs: the output has the
        // input's shape and is finite
        let (vh, vw) = (kh * cfg.downscale(), kw * cfg.downscale());
        let x = seeded(&[1, 4, vh, vw], 1.0, seed ^ 3);
        let cond = net.condition(&effnet, &clip, (vh, vw)).unwrap();
        let y = net.forward(&x, &r, &cond).unwrap();
        prop_assert_eq!(y.dims(), x.dims());
        prop_assert!(all_finite(&y), "non-finite output for a {}x{} latent", vh, vw);
        // other sizes the decoder cannot take are errors (the size rule keeps users away from them), never panics
        let x = seeded(&[1, 4, h, w], 1.0, seed ^ 4);
        if let Ok(cond) = net.condition(&effnet, &clip, (h, w)) {
            if let Ok(y) = net.forward(&x, &r, &cond) {
                prop_assert_eq!(y.dims(), x.dims());
                prop_assert!(all_finite(&y), "non-finite output for a {}x{} latent", h, w);
            }
        }
    }

    #[test]
    fn any_valid_prior_config_builds_and_runs(c in 1usize..12, nhead in 1usize..4, depth in 1usize..3, c_r in 4usize..9, c_in in 1usize..5, h in 1usize..6, w in 1usize..6, seed in any::<u64>()) {
        let cfg = PriorConfig { c_in, c: c * nhead, c_cond: 3, c_r, depth, nhead };
        prop_assert!(cfg.validate().is_ok());
        let net = with_random_weights(seed, |vb| WuerstchenPrior::new(&cfg, vb));
        let cond = net.condition(&seeded(&[2, 4, 3], 1.0, seed ^ 1)).unwrap();
        let x = seeded(&[2, c_in, h, w], 1.0, seed ^ 2);
        let y = net.forward(&x, &Tensor::new(&[0.9f32, 0.1], &Device::Cpu).unwrap(), &cond).unwrap();
        prop_assert_eq!(y.dims(), x.dims());
        prop_assert!(all_finite(&y));
    }

    #[test]
    fn any_valid_vqgan_config_builds_and_decodes(levels in 1usize..4, bottleneck in 0usize..3, embed in 1usize..40, f in 1usize..3, lat in 1usize..5, h in 1usize..5, seed in any::<u64>()) {
        let cfg = VqganConfig { levels, bottleneck_blocks: bottleneck, embed_dim: embed, up_down_scale_factor: f, latent_channels: lat, ..Default::default() };
        prop_assume!(vqgan_config_ok(&cfg));
        prop_assert!(cfg.validate().is_ok());
        let net = with_random_weights(seed, |vb| PaellaVqDecoder::new(&cfg, vb));
        let x = seeded(&[1, lat, h, h + 1], 1.0, seed ^ 1);
        let y = net.decode(&x).unwrap();
        prop_assert_eq!(y.dims(), &[1, 3, h * cfg.upscale(), (h + 1) * cfg.upscale()]);
        prop_assert!(all_finite(&y));
    }

    #[test]
    fn size_rules_accept_exactly_the_sizes_they_produce(px in any::<usize>(), rm in 1e-3f64..1e4, lds in 1e-3f64..1e3, down in 1usize..64, up in 1usize..64) {
        let rule = SizeRule { resolution_multiple: rm, latent_dim_scale: lds, decoder_downscale: down, vqgan_upscale: up };
        let small = px % 5000;
        // accepted exactly when the model produces the size asked for
        prop_assert_eq!(rule.check("--width", small).is_ok(), small > 0 && rule.produced(small) == Some(small));
        if let Err(e) = rule.check("--width", small) {
            prop_assert!(e.to_string().contains("--width"));
            let msg = e.to_string();
            prop_assert!(msg.starts_with(&format!("--width {small} ")), "{}", msg);
            // the sizes it suggests instead are accepted
            if let Some(options) = msg.split("; use ").nth(1) {
                for v in options.split(" or ") {
                    let v: usize = v.parse().unwrap();
                    prop_assert!(rule.check("--width", v).is_ok(), "{} suggests {}", msg, v);
                }
            }
        } else {
            prop_assert_eq!(rule.produced(small), Some(small));
            prop_assert!(small > 0);
        }
        // whatever comes out is a positive multiple of the decoder's and the VQGAN's factors
        if let Some(v) = rule.produced(px) {
            prop_assert!(v > 0 && v % (down * up) == 0, "{} -> {}", px, v);
        }
    }

    #[test]
    fn size_rules_with_whole_factors_take_the_multiples_of_their_step_and_name_the_nearest(
        b in 1usize..16, up in 1usize..16, down in 1usize..64, px in 0usize..20_000,
    ) {
        // resolution_multiple = latent_dim_scale * vqgan_upscale: k * rm px becomes a latent side
        // of k * lds and comes out at k * rm px again, so the valid sizes are the multiples of rm
        // whose latent side divides by the decoder's downscale: the multiples of `step`
        let rm = b * up;
        let rule = SizeRule { resolution_multiple: rm as f64, latent_dim_scale: b as f64, decoder_downscale: down, vqgan_upscale: up };
        let gcd = (1..=b.min(down)).rev().find(|g| b % g == 0 && down % g == 0).unwrap();
        let step = rm * (down / gcd);
        let valid = px > 0 && px % step == 0;
        prop_assert_eq!(rule.check("--height", px).is_ok(), valid, "{} with step {}", px, step);
        prop_assert_eq!(rule.produced(step), Some(step));
        if valid {
            prop_assert_eq!(rule.produced(px), Some(px));
        } else {
            let msg = rule.check("--height", px).unwrap_err().to_string();
            prop_assert!(msg.starts_with(&format!("--height {px} ")), "{}", msg);
            prop_assert!(msg.contains(&format!("multiples of {step} px")), "{}", msg);
            // the nearest valid sizes below and above (searching 4095 px up)
            let below = (px > step).then(|| (px - 1) / step * step);
            let above = Some((px / step + 1) * step).filter(|v| v - px < 4096);
            let options: Vec<String> = [below, above].iter().flatten().map(|v| v.to_string()).collect();
            let hint = if options.is_empty() { "no valid size nearby".to_string() } else { format!("use {}", options.join(" or ")) };
            prop_assert!(msg.ends_with(&format!("; {hint}")), "{} (want {:?})", msg, hint);
        }
    }

    #[test]
    fn requests_are_validated_into_exactly_their_inputs_or_name_the_flag(
        w in prop_oneof![Just(0usize), any::<usize>()], h in prop_oneof![Just(0usize), any::<usize>()],
        g in any::<f64>(), dg in prop_oneof![any::<f64>(), -20f64..20.0], n in prop_oneof![Just(0usize), any::<usize>()],
        steps in proptest::option::of(0usize..100),
        ts in proptest::option::of(prop_oneof![
            prop::collection::vec(any::<f64>(), 0..6),
            prop::collection::vec(0f64..=1.0, 0..6),
            prop::collection::btree_set(1u32..=1000, 1..6).prop_map(|set| set.into_iter().rev().map(|k| f64::from(k) / 1000.0).collect()),
        ]),
        decoder_steps in proptest::option::of(0usize..20),
    ) {
        let s = SamplingInput { width: w, height: h, prior_steps: steps, prior_timesteps: ts, prior_guidance: g, decoder_steps, decoder_timesteps: None, decoder_guidance: dg, num_images: n };
        let got = generate_request("x", "", &s, 0);
        if let Ok(r) = &got {
            prop_assert!(r.prior_timesteps.len() >= 2 && r.prior_guidance.is_finite() && r.num_images > 0);
        }
        check_request(got.as_ref().map_err(|e| e.to_string()), "", expected_request("x", "", &s, 0), &sampling_faults(&s))?;
    }

    #[test]
    fn shard_device_dtype_and_rng_specs_round_trip_or_name_the_input(s in any_spec(), i in 0usize..40, n in 0usize..40) {
        let quoted = format!("{s:?}");
        let norm = s.trim().to_ascii_lowercase();
        match Shard::parse(&s) {
            Ok(sh) => {
                prop_assert!(sh.index < sh.count);
                prop_assert_eq!(Shard::parse(&format!("{}/{}", sh.index, sh.count)), Ok(sh));
            }
            Err(e) => prop_assert!(e.to_string().starts_with(&format!("--shard {quoted}: ")), "{}", e),
        }
        // I/N is accepted exactly when I < N, and then every index goes to exactly one shard
        match Shard::parse(&format!("{i}/{n}")) {
            Ok(sh) => {
                prop_assert!(i < n);
                prop_assert_eq!(sh, Shard { index: i, count: n });
                for k in 0..3 * n {
                    prop_assert_eq!(sh.takes(k), k % n == i);
                }
            }
            Err(_) => prop_assert!(i >= n),
        }
        // the names each spec documents, as typed (trimmed, any case)
        let device = match norm.as_str() {
            "cpu" => Some(DeviceSpec::Cpu),
            _ if !cfg!(feature = "cuda") => None,
            "cuda" | "gpu" => Some(DeviceSpec::Cuda(0)),
            other => other.strip_prefix("cuda:").and_then(|n| n.parse().ok()).map(DeviceSpec::Cuda),
        };
        match wuerstchen::request::parse_device(&s) {
            Ok(d) => {
                prop_assert_eq!(Some(d), device, "{}", quoted);
                if let DeviceSpec::Cuda(k) = d {
                    prop_assert_eq!(wuerstchen::request::parse_device(&format!("cuda:{k}")), Ok(d));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                prop_assert_eq!(device, None, "{}", msg);
                prop_assert!(msg.contains(&quoted) || (!cfg!(feature = "cuda") && msg.contains("no CUDA support")), "{}", msg);
            }
        }
        let dtype = match norm.as_str() {
            "f32" | "float32" | "fp32" => Some(DType::F32),
            "f16" | "float16" | "fp16" | "half" => Some(DType::F16),
            "bf16" | "bfloat16" => Some(DType::BF16),
            _ => None,
        };
        match wuerstchen::request::parse_dtype(&s) {
            Ok(d) => {
                prop_assert_eq!(Some(d), dtype, "{}", quoted);
                prop_assert_eq!(wuerstchen::request::parse_dtype(d.as_str()), Ok(d));
            }
            Err(e) => {
                prop_assert_eq!(dtype, None, "{}", e);
                prop_assert!(e.to_string().contains(&quoted), "{}", e);
            }
        }
        let rng = match norm.as_str() {
            "cpu" => Some(BoxMuller::Vectorized),
            "cpu-scalar" => Some(BoxMuller::Scalar),
            _ => None,
        };
        match wuerstchen::request::parse_rng(&s) {
            Ok(k) => prop_assert_eq!(Some(k), rng, "{}", quoted),
            Err(e) => {
                prop_assert_eq!(rng, None, "{}", e);
                prop_assert!(e.to_string().contains(&quoted), "{}", e);
            }
        }
    }
}
